//! The deployment recipes under `deploy/` cannot drift from the code: each
//! is parsed here, its backend URL is parsed by the library, and the numbers
//! that must agree are checked against the library's defaults (the shutdown
//! budget against the grace period before SIGKILL, ports against each
//! other, seeds against the names the platform gives).

use std::path::{Path, PathBuf};
use std::time::Duration;

use highlander::DEFAULT_SHUTDOWN;
use yaml_rust2::{Yaml, YamlLoader};

/// What every platform's grace period must leave beyond the shutdown
/// budget: the release round trip and the backend session's close.
const RELEASE_SLACK: Duration = Duration::from_secs(5);

fn recipe(path: &str) -> (PathBuf, String) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(path);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    (path, text)
}

fn yaml(path: &str) -> Vec<Yaml> {
    let (path, text) = recipe(path);
    YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Checks a `cluster://` URL the way the runtime would read it (with the
/// cookie that the platform injects), and returns its port and seeds.
fn cluster_url(url: &str) -> (u16, Vec<(String, u16)>) {
    let with_cookie = format!("{url}&cookie=0123456789abcdef0123456789abcdef");
    if let Err(e) = highlander::backend::from_url(&with_cookie) {
        panic!("the recipe's backend URL does not parse: {e}");
    }
    let rest = url.strip_prefix("cluster://").expect("a cluster:// URL");
    let (listen, query) = rest.split_once('?').expect("a query with seeds");
    let port = listen
        .rsplit_once(':')
        .expect("host:port")
        .1
        .parse()
        .unwrap();
    let seeds = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("seeds="))
        .expect("seeds=")
        .split(',')
        .map(|s| {
            let (host, port) = s.rsplit_once(':').expect("seed host:port");
            (host.to_string(), port.parse().unwrap())
        })
        .collect();
    (port, seeds)
}

fn grace_is_enough(what: &str, grace: Duration) {
    assert!(
        grace >= DEFAULT_SHUTDOWN + RELEASE_SLACK,
        "{what} ({grace:?}) must exceed the default shutdown budget ({DEFAULT_SHUTDOWN:?}) \
         plus {RELEASE_SLACK:?} for the release, or a graceful stop ends in SIGKILL"
    );
}

fn env_value<'a>(container: &'a Yaml, name: &str) -> &'a Yaml {
    container["env"]
        .as_vec()
        .expect("env")
        .iter()
        .find(|e| e["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("the container sets no {name}"))
}

#[test]
fn kubernetes_statefulset_agrees_with_the_code() {
    let docs = yaml("kubernetes/highlander.yaml");
    let of_kind = |kind: &str| {
        docs.iter()
            .find(|d| d["kind"].as_str() == Some(kind))
            .unwrap_or_else(|| panic!("no {kind} in the manifest"))
    };
    let service = of_kind("Service");
    let set = of_kind("StatefulSet");
    let service_name = service["metadata"]["name"].as_str().unwrap();
    assert_eq!(
        service["spec"]["clusterIP"].as_str(),
        Some("None"),
        "headless"
    );
    assert_eq!(set["spec"]["serviceName"].as_str(), Some(service_name));

    let pod = &set["spec"]["template"]["spec"];
    let grace = pod["terminationGracePeriodSeconds"].as_i64().unwrap();
    grace_is_enough(
        "terminationGracePeriodSeconds",
        Duration::from_secs(grace as u64),
    );

    let container = &pod["containers"][0];
    let port_named = |name: &str| {
        container["ports"]
            .as_vec()
            .unwrap()
            .iter()
            .find(|p| p["name"].as_str() == Some(name))
            .and_then(|p| p["containerPort"].as_i64())
            .unwrap_or_else(|| panic!("no container port named {name}")) as u16
    };

    let url = env_value(container, "HIGHLANDER_BACKEND")["value"]
        .as_str()
        .unwrap();
    let (port, seeds) = cluster_url(url);
    assert_eq!(port, port_named("cluster"));
    assert_eq!(
        service["spec"]["ports"][0]["port"].as_i64(),
        Some(port as i64)
    );
    let set_name = set["metadata"]["name"].as_str().unwrap();
    let replicas = set["spec"]["replicas"].as_i64().unwrap();
    let expected: Vec<(String, u16)> = (0..replicas)
        .map(|i| (format!("{set_name}-{i}.{service_name}"), port))
        .collect();
    assert_eq!(seeds, expected, "every pod's stable name is a seed");

    let cookie = env_value(container, "HIGHLANDER_COOKIE");
    assert!(
        !cookie["valueFrom"]["secretKeyRef"]["name"].is_badvalue(),
        "the cookie comes from a Secret, never a literal in the manifest"
    );
    assert_eq!(
        env_value(container, "HIGHLANDER_NODE")["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
        Some("metadata.name")
    );

    let http = env_value(container, "HIGHLANDER_HTTP")["value"]
        .as_str()
        .unwrap();
    let http_port: u16 = http.rsplit_once(':').unwrap().1.parse().unwrap();
    assert_eq!(http_port, port_named("http"));
    let probe = &container["readinessProbe"]["httpGet"];
    assert_eq!(probe["path"].as_str(), Some("/readyz"));
    assert_eq!(probe["port"].as_str(), Some("http"));
}

#[test]
fn systemd_unit_agrees_with_the_code() {
    let (_, text) = recipe("systemd/app.service");
    let setting = |key: &str| -> Vec<&str> {
        text.lines()
            .filter_map(|l| l.trim().strip_prefix(key)?.strip_prefix('='))
            .collect()
    };
    assert_eq!(setting("KillSignal"), ["SIGTERM"]);
    assert_eq!(setting("Restart"), ["always"]);
    let stop: u64 = setting("TimeoutStopSec")[0].parse().unwrap();
    grace_is_enough("TimeoutStopSec", Duration::from_secs(stop));
    let backend = setting("Environment")
        .into_iter()
        .find_map(|e| e.strip_prefix("HIGHLANDER_BACKEND="))
        .expect("Environment=HIGHLANDER_BACKEND=");
    let (port, seeds) = cluster_url(backend);
    assert!(seeds.iter().all(|(_, p)| *p == port), "{seeds:?}");
    assert!(
        setting("Environment")
            .iter()
            .all(|e| !e.starts_with("HIGHLANDER_COOKIE")),
        "the cookie belongs in the EnvironmentFile, not the unit"
    );
}

#[test]
fn compose_file_agrees_with_the_code() {
    let docs = yaml("compose/compose.yaml");
    let services = docs[0]["services"].as_hash().expect("services");
    let names: Vec<&str> = services.keys().map(|k| k.as_str().unwrap()).collect();
    assert_eq!(names.len(), 3);
    for (name, service) in services {
        let name = name.as_str().unwrap();
        // Settings shared through the `x-node` anchor.
        let shared = &service["<<"];
        let get = |key: &str| {
            let own = &service[key];
            if own.is_badvalue() { &shared[key] } else { own }
        };
        assert_eq!(get("stop_signal").as_str(), Some("SIGTERM"), "{name}");
        let grace = get("stop_grace_period").as_str().unwrap();
        let secs: u64 = grace.strip_suffix('s').unwrap().parse().unwrap();
        grace_is_enough("stop_grace_period", Duration::from_secs(secs));
        let env = &service["environment"];
        assert_eq!(env["HIGHLANDER_NODE"].as_str(), Some(name));
        let (port, seeds) = cluster_url(env["HIGHLANDER_BACKEND"].as_str().unwrap());
        let seed_names: Vec<&str> = seeds.iter().map(|(h, _)| h.as_str()).collect();
        assert_eq!(seed_names, names, "{name}: every service is a seed");
        assert!(seeds.iter().all(|(_, p)| *p == port));
        assert!(
            env["HIGHLANDER_COOKIE"]
                .as_str()
                .is_some_and(|c| c.starts_with("${")),
            "{name}: the cookie comes from the environment"
        );
    }
}
