//! Serde forms that are not derived: wall-clock times as milliseconds since
//! the Unix epoch, and [`ShutdownReason`] as its display text.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::ShutdownReason;

/// `SystemTime` as milliseconds since the Unix epoch (what JavaScript's
/// `Date` takes).
pub(crate) mod unix_ms {
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        let ms = t
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        s.serialize_u64(ms)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        let ms = u64::deserialize(d)?;
        Ok(UNIX_EPOCH + Duration::from_millis(ms))
    }
}

/// As its display text: `"normal"`, `"error: disk full"`, `"lease lost"`.
impl Serialize for ShutdownReason {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ShutdownReason {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Ok(match text.as_str() {
            "conflict" => ShutdownReason::Conflict,
            "lease lost" => ShutdownReason::LeaseLost,
            "node shutdown" => ShutdownReason::NodeShutdown,
            "stepdown" => ShutdownReason::Stepdown,
            "normal" => ShutdownReason::Normal,
            "moved" => ShutdownReason::Moved,
            "removed" => ShutdownReason::Removed,
            other => match other.strip_prefix("error: ") {
                Some(why) => ShutdownReason::Error(why.to_string()),
                None => {
                    return Err(serde::de::Error::custom(format!(
                        "unknown shutdown reason `{other}`: expected conflict, lease lost, \
                         node shutdown, stepdown, normal, moved, removed or `error: …`"
                    )));
                }
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_round_trip() {
        for reason in [
            ShutdownReason::Conflict,
            ShutdownReason::LeaseLost,
            ShutdownReason::NodeShutdown,
            ShutdownReason::Stepdown,
            ShutdownReason::Normal,
            ShutdownReason::Moved,
            ShutdownReason::Removed,
            ShutdownReason::Error("disk: full".into()),
        ] {
            let json = serde_json::to_string(&reason).unwrap();
            let back: ShutdownReason = serde_json::from_str(&json).unwrap();
            assert_eq!(back, reason, "{json}");
        }
        assert!(serde_json::from_str::<ShutdownReason>("\"eaten\"").is_err());
    }
}
