//! Child specs: what the runtime needs to know to run one singleton.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::service::{BoxFuture, DynService};
use crate::{Context, Error, Result, Service};

/// When a stopped instance is started again (OTP's restart values).
///
/// ```
/// use highlander::Restart;
/// assert_eq!("transient".parse::<Restart>().unwrap(), Restart::Transient);
/// assert!("sometimes".parse::<Restart>().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Restart {
    /// Always restarted, also after a normal return (the default).
    #[default]
    Permanent,
    /// Restarted only after an error or a panic.
    Transient,
    /// Never restarted: once it stops, this node keeps the id but runs nothing
    /// for it until it loses the id or shuts down.
    Temporary,
}

impl std::str::FromStr for Restart {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "permanent" => Ok(Restart::Permanent),
            "transient" => Ok(Restart::Transient),
            "temporary" => Ok(Restart::Temporary),
            other => Err(Error::config(format!(
                "unknown restart policy `{other}`: use \"permanent\", \"transient\" or \"temporary\""
            ))),
        }
    }
}

/// How often an instance may fail before the node steps down (OTP's
/// `intensity` in `period`). The default is 3 restarts in 5 seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Intensity {
    /// Restarts allowed within `period`.
    pub max_restarts: u32,
    /// The sliding window.
    pub period: Duration,
}

impl Default for Intensity {
    fn default() -> Self {
        Intensity {
            max_restarts: 3,
            period: Duration::from_secs(5),
        }
    }
}

/// The default shutdown budget: how long cancellation plus `terminate` may take.
pub const DEFAULT_SHUTDOWN: Duration = Duration::from_secs(5);

/// The part of a shutdown budget kept for `terminate`: a quarter. `run` and
/// the children are abandoned when only this much of the budget is left.
pub(crate) fn terminate_reserve(budget: Duration) -> Duration {
    budget / 4
}

/// Longest singleton id in bytes.
pub const MAX_ID_LEN: usize = 200;

/// Checks a singleton id: 1 to 200 bytes of `[A-Za-z0-9._:/-]`.
///
/// The `#[highlander]` attribute applies the same rule at compile time; ids
/// given at run time are checked when the runtime starts.
///
/// ```
/// assert!(highlander::validate_id("tenant/42:sync").is_ok());
/// assert!(highlander::validate_id("has space").is_err());
/// assert!(highlander::validate_id("").is_err());
/// ```
pub fn validate_id(id: &str) -> Result<()> {
    let why = if id.is_empty() {
        Some("an id must not be empty")
    } else if id.len() > MAX_ID_LEN {
        Some("an id must be at most 200 bytes long")
    } else if !id.bytes().all(is_id_byte) {
        Some("an id may only contain A-Z a-z 0-9 and . _ : / -")
    } else {
        None
    };
    match why {
        None => Ok(()),
        Some(why) => Err(Error::InvalidId {
            id: id.chars().take(60).collect(),
            why,
        }),
    }
}

fn is_id_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'/' | b'-')
}

/// Gives a closure the higher-ranked signature the runtime stores.
fn higher_ranked<F>(f: F) -> Arc<BuildFn>
where
    F: for<'a> Fn(&'a Context) -> BoxFuture<'a, Result<Box<dyn DynService>>>
        + Send
        + Sync
        + 'static,
{
    Arc::new(f)
}

/// The build glue `#[highlander]` generates. Not public API.
#[doc(hidden)]
pub(crate) type BuildFnPtr = for<'a> fn(&'a Context) -> BoxFuture<'a, Result<Box<dyn DynService>>>;

type BuildFn =
    dyn for<'a> Fn(&'a Context) -> BoxFuture<'a, Result<Box<dyn DynService>>> + Send + Sync;

/// Everything the runtime needs to run one singleton: its id, how to build
/// it, and its supervision settings. `#[highlander]` makes one per annotated
/// type; [`ChildSpec::new`] makes one for ids known only at run time.
///
/// ```
/// use highlander::{ChildSpec, Context, Restart, Service};
/// use std::time::Duration;
///
/// struct TenantSync { tenant: String }
/// impl Service for TenantSync {
///     async fn run(&mut self, ctx: &Context) -> highlander::Result<()> {
///         ctx.cancelled().await;
///         Ok(())
///     }
/// }
///
/// let tenant = "acme".to_string();
/// let spec = ChildSpec::new(format!("tenant-sync/{tenant}"), move |_ctx| {
///     let tenant = tenant.clone();
///     async move { Ok(TenantSync { tenant }) }
/// })
/// .restart(Restart::Transient)
/// .shutdown(Duration::from_secs(2));
/// assert_eq!(spec.id(), "tenant-sync/acme");
/// ```
#[derive(Clone)]
pub struct ChildSpec {
    pub(crate) id: Arc<str>,
    pub(crate) type_name: Arc<str>,
    pub(crate) restart: Restart,
    pub(crate) shutdown: Duration,
    pub(crate) intensity: Intensity,
    pub(crate) build: Arc<BuildFn>,
    /// Made by `#[highlander]` (so also in [`registered`]).
    pub(crate) registered: bool,
}

impl ChildSpec {
    /// A spec for `id` whose instances `factory` builds. The factory runs at
    /// the start of every tenure and every restart, with the instance's
    /// [`Context`]. A panic in it, also in its synchronous part before the
    /// future it returns, stops that attempt with
    /// [`ShutdownReason::Error`](crate::ShutdownReason::Error) like an error
    /// does.
    pub fn new<S, F, Fut>(id: impl Into<String>, factory: F) -> Self
    where
        S: Service,
        F: Fn(&Context) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<S>> + Send + 'static,
    {
        let build = higher_ranked(move |ctx| {
            let fut = factory(ctx);
            Box::pin(async move { Ok(Box::new(fut.await?) as Box<dyn DynService>) })
        });
        ChildSpec {
            id: Arc::from(id.into()),
            type_name: Arc::from(std::any::type_name::<S>()),
            restart: Restart::default(),
            shutdown: DEFAULT_SHUTDOWN,
            intensity: Intensity::default(),
            build,
            registered: false,
        }
    }

    /// The spec of a type marked with `#[highlander]`.
    pub fn of<S: Singleton>() -> Self {
        S::child_spec()
    }

    /// Sets the restart policy (default [`Restart::Permanent`]).
    #[must_use]
    pub fn restart(mut self, restart: Restart) -> Self {
        self.restart = restart;
        self
    }

    /// Sets how long cancellation and `terminate` may take together
    /// (default 5 s).
    ///
    /// The budget counts from the moment the instance is cancelled. `run` and
    /// the children spawned with [`Context::spawn`] get the first three
    /// quarters of it; whatever of them still runs then is dropped (children
    /// aborted) and the overrun logged. `terminate` always runs next, with
    /// the rest of the budget: at least the last quarter (the terminate
    /// reserve), more when `run` and the children stopped early. A
    /// `terminate` that overruns the end of the budget is dropped.
    #[must_use]
    pub fn shutdown(mut self, budget: Duration) -> Self {
        self.shutdown = budget;
        self
    }

    /// Sets the restart intensity: more than `max_restarts` restarts within
    /// `period` make the node step down (default 3 in 5 s).
    #[must_use]
    pub fn intensity(mut self, max_restarts: u32, period: Duration) -> Self {
        self.intensity = Intensity {
            max_restarts,
            period,
        };
        self
    }

    /// The singleton id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The name of the service type, for messages.
    pub fn type_name(&self) -> &str {
        &self.type_name
    }
}

impl fmt::Debug for ChildSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChildSpec")
            .field("id", &self.id)
            .field("type_name", &self.type_name)
            .field("restart", &self.restart)
            .field("shutdown", &self.shutdown)
            .field("intensity", &self.intensity)
            .finish_non_exhaustive()
    }
}

/// Implemented by `#[highlander]` for the annotated type.
///
/// ```
/// use highlander::{highlander, Context, Service, Singleton};
///
/// #[highlander(id = "reporter")]
/// #[derive(Default)]
/// struct Reporter;
///
/// impl Service for Reporter {
///     async fn run(&mut self, ctx: &Context) -> highlander::Result<()> {
///         ctx.cancelled().await;
///         Ok(())
///     }
/// }
///
/// assert_eq!(Reporter::ID, "reporter");
/// assert_eq!(Reporter::child_spec().id(), "reporter");
/// ```
pub trait Singleton: Service + Sized {
    /// The id given in the attribute.
    const ID: &'static str;

    /// The child spec the attribute describes.
    fn child_spec() -> ChildSpec;
}

/// What `#[highlander]` submits to the inventory. Not public API.
#[doc(hidden)]
pub struct Registration {
    pub id: &'static str,
    pub type_name: &'static str,
    pub spec: fn() -> ChildSpec,
}

inventory::collect!(Registration);

/// Builds a spec from the parts the attribute knows. Not public API.
#[doc(hidden)]
pub fn __spec(
    id: &'static str,
    type_name: &'static str,
    restart: Restart,
    shutdown: Duration,
    intensity: Intensity,
    build: BuildFnPtr,
) -> ChildSpec {
    ChildSpec {
        id: Arc::from(id),
        type_name: Arc::from(type_name),
        restart,
        shutdown,
        intensity,
        build: Arc::new(build),
        registered: true,
    }
}

/// Every registered spec, in a stable order (by id, then type name), with
/// duplicates reported as [`Error::DuplicateId`] naming both types.
pub(crate) fn registered() -> Result<Vec<ChildSpec>> {
    let mut regs: Vec<&Registration> = inventory::iter::<Registration>.into_iter().collect();
    regs.sort_by(|a, b| (a.id, a.type_name).cmp(&(b.id, b.type_name)));
    for pair in regs.windows(2) {
        if pair[0].id == pair[1].id {
            return Err(Error::DuplicateId {
                id: pair[0].id.to_string(),
                first: pair[0].type_name.to_string(),
                second: pair[1].type_name.to_string(),
            });
        }
    }
    Ok(regs.into_iter().map(|r| (r.spec)()).collect())
}
