//! Every key of the attribute, on a struct and on an enum, compiles and
//! registers a spec with the values given.
use highlander::{highlander, Context, Restart, Service, Singleton};

mod reexport {
    pub use highlander as hl;
}

#[highlander(
    id = "tenant/acme:sync.v2",
    restart = "transient",
    shutdown = "250ms",
    intensity = 7,
    period = "1m",
    init = Sweeper::connect,
    crate = reexport::hl
)]
struct Sweeper {
    url: String,
}

impl Sweeper {
    async fn connect(ctx: &Context) -> highlander::Result<Self> {
        Ok(Sweeper { url: format!("db-for-{}", ctx.node()) })
    }
}

impl Service for Sweeper {
    async fn run(&mut self, ctx: &Context) -> highlander::Result<()> {
        let _ = &self.url;
        ctx.cancelled().await;
        Ok(())
    }
}

#[highlander(id = "mode", restart = "temporary")]
#[derive(Default)]
enum Mode {
    #[default]
    Idle,
    Busy,
}

impl Service for Mode {
    async fn run(&mut self, _ctx: &Context) -> highlander::Result<()> {
        *self = Mode::Busy;
        Ok(())
    }
}

fn main() {
    let spec = Sweeper::child_spec();
    assert_eq!(spec.id(), "tenant/acme:sync.v2");
    assert_eq!(Sweeper::ID, "tenant/acme:sync.v2");
    let debug = format!("{spec:?}");
    assert!(debug.contains("Transient"), "{debug}");
    assert!(debug.contains("250ms"), "{debug}");
    assert!(debug.contains("max_restarts: 7"), "{debug}");
    assert!(debug.contains("period: 60s"), "{debug}");
    assert!(spec.type_name().ends_with("Sweeper"));
    assert_eq!(Mode::child_spec().id(), "mode");
    let _ = Restart::Temporary;
}
