//! The attribute's errors are part of the product: each bad input has a
//! case in `fail/` with the exact message and span checked in beside it.
//! Regenerate after an intended change with `TRYBUILD=overwrite`.

#[test]
fn attribute_errors() {
    let t = trybuild::TestCases::new();
    t.compile_fail("fail/*.rs");
    t.pass("pass/*.rs");
}
