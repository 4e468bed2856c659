//! The `cluster` backend (being built; see the issue for it).

use crate::backend::Backend;
use crate::{Error, Result};

pub(crate) fn from_url(_url: &str) -> Result<Box<dyn Backend>> {
    Err(Error::Config("the cluster backend is not available in this build yet".into()))
}
