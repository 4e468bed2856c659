//! The backend URL the command connects with.

/// The URL to connect with as an observer: for `cluster://` the nodes' own
/// URL with the listen port set to 0 (the command listens on a port of its
/// own, on the same interface, so members can reach it); other URLs as they
/// are. The memory backend lives inside one process: nothing to observe.
pub(crate) fn observer(url: &str) -> Result<String, String> {
    let url = url.trim();
    let scheme = url.split_once("://").map(|(s, _)| s).unwrap_or(url);
    match scheme {
        "memory" | "mem" => Err(
            "the memory backend lives inside one process: point the command at a \
             cluster://, postgres:// or etcd:// backend"
                .into(),
        ),
        "cluster" => {
            let rest = &url["cluster://".len()..];
            let (listen, query) = match rest.split_once('?') {
                Some((l, q)) => (l, Some(q)),
                None => (rest, None),
            };
            let host = match listen.rsplit_once(':') {
                Some((host, _port)) => host,
                None => listen,
            };
            let host = if host.is_empty() { "127.0.0.1" } else { host };
            Ok(match query {
                Some(q) => format!("cluster://{host}:0?{q}"),
                None => format!("cluster://{host}:0"),
            })
        }
        _ => Ok(url.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::observer;

    #[test]
    fn a_cluster_observer_listens_on_a_port_of_its_own() {
        assert_eq!(
            observer("cluster://0.0.0.0:7400?seeds=a:7400,b:7400").unwrap(),
            "cluster://0.0.0.0:0?seeds=a:7400,b:7400"
        );
        assert_eq!(
            observer("cluster://[::1]:7400?seeds=[::1]:7401").unwrap(),
            "cluster://[::1]:0?seeds=[::1]:7401"
        );
        assert_eq!(
            observer("postgres://app:pw@db/app").unwrap(),
            "postgres://app:pw@db/app"
        );
        assert!(observer("memory").unwrap_err().contains("one process"));
    }
}
