//! The Kubernetes manifests in `deploy/kubernetes/` against the weighbridge configuration their
//! ConfigMap embeds and the binary that reads it, so that neither drifts from the other:
//!
//! - the container ports and the Services' target ports are the listener's and the admin
//!   endpoint's ports, and both bind an address the kubelet and other pods can reach;
//! - the probes ask for `/healthz` on the admin port;
//! - `--config` is the ConfigMap's mount path plus its key, mounted as a directory;
//! - the termination grace period outlasts the preStop sleep plus `shutdown_grace`;
//! - `threads` is the CPU the pod requests;
//! - selectors match the pod labels they are meant for;
//! - the pool's backend name is the headless Service's, its port the vLLM container's, and its
//!   slots the vLLM server's concurrency;
//! - the embedded configuration passes `weighbridge --check`.
//!
//! No cluster, no `kubectl`, no network: the YAML is read as data.

mod support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_yaml_ng::Value as Yaml;
use toml::{Table, Value as Toml};

use support::{config_file, run};

/// The namespace every namespaced manifest is in, and the one the backend name spells.
const NAMESPACE: &str = "inference";
/// The weighbridge Deployment, and the name of its container.
const WEIGHBRIDGE: &str = "weighbridge";
/// What `shutdown_grace` is when the file leaves it out (docs/configuration.md).
const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes")
}

/// One parsed manifest and the file it came from.
struct Manifest {
    file: String,
    doc: Yaml,
}

impl Manifest {
    fn kind(&self) -> &str {
        text(&self.doc, &["kind"], &self.file)
    }

    fn name(&self) -> &str {
        text(&self.doc, &["metadata", "name"], &self.file)
    }
}

/// The value at `path` under `value`; fails naming the file and the path.
fn at<'a>(value: &'a Yaml, path: &[&str], file: &str) -> &'a Yaml {
    let mut here = value;
    for (i, key) in path.iter().enumerate() {
        here = here
            .get(*key)
            .unwrap_or_else(|| panic!("{file}: no `{}`", path[..=i].join(".")));
    }
    here
}

/// The string at `path` under `value`.
fn text<'a>(value: &'a Yaml, path: &[&str], file: &str) -> &'a str {
    at(value, path, file)
        .as_str()
        .unwrap_or_else(|| panic!("{file}: `{}` is not a string", path.join(".")))
}

/// The integer at `path` under `value`.
fn integer(value: &Yaml, path: &[&str], file: &str) -> u64 {
    at(value, path, file)
        .as_u64()
        .unwrap_or_else(|| panic!("{file}: `{}` is not an integer", path.join(".")))
}

/// The sequence at `path` under `value`.
fn list<'a>(value: &'a Yaml, path: &[&str], file: &str) -> &'a [Yaml] {
    at(value, path, file)
        .as_sequence()
        .unwrap_or_else(|| panic!("{file}: `{}` is not a list", path.join(".")))
}

/// Every manifest in the directory but the kustomization, each parsed as one YAML document.
fn manifests() -> Vec<Manifest> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir()).expect("read deploy/kubernetes/") {
        let path = entry.expect("list deploy/kubernetes/").path();
        let file = path
            .file_name()
            .and_then(|n| n.to_str())
            .expect("manifest names are UTF-8")
            .to_owned();
        if !file.ends_with(".yaml") || file == "kustomization.yaml" {
            continue;
        }
        let source = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("read deploy/kubernetes/{file}: {e}"));
        // One document per file: a second one would be applied by kubectl yet be invisible to
        // the checks below.
        let doc: Yaml = serde_yaml_ng::from_str(&source)
            .unwrap_or_else(|e| panic!("deploy/kubernetes/{file} is not one YAML document: {e}"));
        out.push(Manifest { file, doc });
    }
    out.sort_by(|a, b| a.file.cmp(&b.file));
    assert!(
        out.len() >= 6,
        "deploy/kubernetes/ holds the manifests: found {:?}",
        out.iter().map(|m| &m.file).collect::<Vec<_>>()
    );
    out
}

/// The manifest of `kind` named `name`.
fn find<'a>(all: &'a [Manifest], kind: &str, name: &str) -> &'a Manifest {
    let found: Vec<&Manifest> = all
        .iter()
        .filter(|m| m.kind() == kind && m.name() == name)
        .collect();
    assert_eq!(found.len(), 1, "exactly one {kind} named `{name}`");
    found[0]
}

fn of_kind<'a>(all: &'a [Manifest], kind: &'a str) -> impl Iterator<Item = &'a Manifest> {
    all.iter().filter(move |m| m.kind() == kind)
}

/// The container of a Deployment named like the Deployment.
fn container(deployment: &Manifest) -> &Yaml {
    let containers = list(
        &deployment.doc,
        &["spec", "template", "spec", "containers"],
        &deployment.file,
    );
    containers
        .iter()
        .find(|c| c.get("name").and_then(Yaml::as_str) == Some(deployment.name()))
        .unwrap_or_else(|| {
            panic!(
                "{}: no container named `{}`",
                deployment.file,
                deployment.name()
            )
        })
}

/// The container port `port` names: a number as it is, a name through the container's ports.
fn resolve_port(container: &Yaml, port: &Yaml, file: &str) -> u16 {
    let number = match port {
        Yaml::Number(n) => n.as_u64(),
        Yaml::String(name) => list(container, &["ports"], file)
            .iter()
            .find(|p| p.get("name").and_then(Yaml::as_str) == Some(name.as_str()))
            .map(|p| integer(p, &["containerPort"], file)),
        _ => None,
    };
    let number = number.unwrap_or_else(|| panic!("{file}: port {port:?} names no container port"));
    u16::try_from(number).unwrap_or_else(|_| panic!("{file}: port {number} out of range"))
}

/// The container's ports, by number.
fn container_ports(container: &Yaml, file: &str) -> BTreeSet<u16> {
    list(container, &["ports"], file)
        .iter()
        .map(|p| resolve_port(container, at(p, &["containerPort"], file), file))
        .collect()
}

/// The container's command and arguments, as one list of words.
fn words(container: &Yaml, file: &str) -> Vec<String> {
    ["command", "args"]
        .iter()
        .filter_map(|key| container.get(*key))
        .flat_map(|v| {
            v.as_sequence()
                .unwrap_or_else(|| panic!("{file}: command/args is not a list"))
        })
        .map(|w| match w {
            Yaml::String(s) => s.clone(),
            Yaml::Number(n) => n.to_string(),
            other => panic!("{file}: argument {other:?} is not a string"),
        })
        .collect()
}

/// The value of `--flag VALUE` or `--flag=VALUE` in `words`.
fn flag<'a>(words: &'a [String], flag: &str) -> Option<&'a str> {
    let prefix = format!("{flag}=");
    words.iter().enumerate().find_map(|(i, w)| {
        if w == flag {
            words.get(i + 1).map(String::as_str)
        } else {
            w.strip_prefix(&prefix)
        }
    })
}

/// True when every label of `selector` is on `labels`.
fn selects(selector: &Yaml, labels: &Yaml) -> bool {
    let selector = selector
        .as_mapping()
        .expect("a selector is a map of labels");
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// The pod labels of a Deployment.
fn pod_labels(deployment: &Manifest) -> &Yaml {
    at(
        &deployment.doc,
        &["spec", "template", "metadata", "labels"],
        &deployment.file,
    )
}

/// The Deployments whose pods `selector` selects.
fn selected<'a>(all: &'a [Manifest], selector: &Yaml) -> Vec<&'a str> {
    of_kind(all, "Deployment")
        .filter(|d| selects(selector, pod_labels(d)))
        .map(Manifest::name)
        .collect()
}

/// The weighbridge configuration the weighbridge Deployment is started with: the ConfigMap key
/// that `--config` names through the volume mounted there, as text and parsed.
struct Embedded {
    text: String,
    table: Table,
}

fn embedded(all: &[Manifest]) -> Embedded {
    let deployment = find(all, "Deployment", WEIGHBRIDGE);
    let file = deployment.file.as_str();
    let container = container(deployment);
    let words = words(container, file);
    let config = flag(&words, "--config")
        .or_else(|| flag(&words, "-c"))
        .unwrap_or_else(|| panic!("{file}: weighbridge is started without --config: {words:?}"));
    let config = Path::new(config);
    let (mount_dir, key) = (
        config.parent().expect("--config has a directory"),
        config
            .file_name()
            .and_then(|n| n.to_str())
            .expect("--config names a file"),
    );
    let mount = list(container, &["volumeMounts"], file)
        .iter()
        .find(|m| Path::new(text(m, &["mountPath"], file)) == mount_dir)
        .unwrap_or_else(|| panic!("{file}: nothing is mounted at {}", mount_dir.display()));
    // A subPath mount binds the file as it was when the container started: the kubelet's
    // symlink swap never reaches it, so an edited ConfigMap would never be reloaded.
    assert!(
        mount.get("subPath").is_none() && mount.get("subPathExpr").is_none(),
        "{file}: the config is mounted with a subPath, which never sees ConfigMap updates"
    );
    let volume_name = text(mount, &["name"], file);
    let volume = list(
        &deployment.doc,
        &["spec", "template", "spec", "volumes"],
        file,
    )
    .iter()
    .find(|v| v.get("name").and_then(Yaml::as_str) == Some(volume_name))
    .unwrap_or_else(|| panic!("{file}: no volume `{volume_name}`"));
    assert!(
        volume["configMap"].get("items").is_none(),
        "{file}: `items` would rename keys; the file name must be the ConfigMap key"
    );
    let map_name = text(volume, &["configMap", "name"], file);
    let map = find(all, "ConfigMap", map_name);
    let text = text(&map.doc, &["data", key], &map.file).to_owned();
    let table: Table =
        toml::from_str(&text).unwrap_or_else(|e| panic!("{}: `{key}` is not TOML: {e}", map.file));
    Embedded { text, table }
}

/// The table (or array of tables) at `key` of `table`.
fn toml_at<'a>(table: &'a Table, key: &str) -> &'a Toml {
    table
        .get(key)
        .unwrap_or_else(|| panic!("the embedded config has no `{key}`"))
}

fn toml_str<'a>(table: &'a Table, key: &str) -> &'a str {
    toml_at(table, key)
        .as_str()
        .unwrap_or_else(|| panic!("the embedded config's `{key}` is not a string"))
}

/// The one `[[listener]]` of the embedded config.
fn listener(config: &Table) -> &Table {
    let listeners = toml_at(config, "listener")
        .as_array()
        .expect("`listener` is an array of tables");
    assert_eq!(
        listeners.len(),
        1,
        "the Service exposes one client port, for one listener"
    );
    listeners[0].as_table().expect("a listener is a table")
}

/// The pool the listener sends to: a `[[pool]]` it names, or its own inline one.
fn pool<'a>(config: &'a Table, listener: &'a Table) -> &'a Table {
    let Some(name) = listener.get("pool").and_then(Toml::as_str) else {
        return listener;
    };
    toml_at(config, "pool")
        .as_array()
        .expect("`pool` is an array of tables")
        .iter()
        .filter_map(Toml::as_table)
        .find(|p| p.get("name").and_then(Toml::as_str) == Some(name))
        .unwrap_or_else(|| panic!("the listener names pool `{name}`, which is not defined"))
}

fn bind(table: &Table, what: &str) -> SocketAddr {
    let bind = toml_str(table, "bind");
    bind.parse()
        .unwrap_or_else(|e| panic!("{what} bind `{bind}` is not IP:port: {e}"))
}

/// The `[admin]` bind of the embedded config.
fn admin_bind(config: &Table) -> SocketAddr {
    let admin = toml_at(config, "admin")
        .as_table()
        .expect("the embedded config has an [admin] table, for the probes");
    bind(admin, "[admin]")
}

/// A CPU quantity ("2", "1500m", 2) in cores.
fn cores(quantity: &Yaml, file: &str) -> f64 {
    match quantity {
        Yaml::Number(n) => n.as_f64().expect("a number"),
        Yaml::String(s) => match s.strip_suffix('m') {
            Some(milli) => milli.parse::<f64>().map(|m| m / 1000.0).ok(),
            None => s.parse().ok(),
        }
        .unwrap_or_else(|| panic!("{file}: CPU quantity `{s}` not understood")),
        other => panic!("{file}: CPU quantity {other:?} not understood"),
    }
}

#[test]
fn the_kustomization_lists_every_manifest_and_nothing_else() {
    let path = dir().join("kustomization.yaml");
    let source = std::fs::read_to_string(&path).expect("read deploy/kubernetes/kustomization.yaml");
    let doc: Yaml = serde_yaml_ng::from_str(&source).expect("kustomization.yaml is YAML");
    assert_eq!(text(&doc, &["kind"], "kustomization.yaml"), "Kustomization");
    let listed: BTreeSet<&str> = list(&doc, &["resources"], "kustomization.yaml")
        .iter()
        .map(|r| r.as_str().expect("a resource is a file name"))
        .collect();
    let files: BTreeSet<String> = manifests().into_iter().map(|m| m.file).collect();
    let files: BTreeSet<&str> = files.iter().map(String::as_str).collect();
    assert_eq!(
        listed, files,
        "`kubectl apply -k` applies what kustomization.yaml lists: every manifest, once"
    );
}

#[test]
fn every_manifest_has_a_kind_a_name_and_the_namespace() {
    let all = manifests();
    for m in &all {
        let api = text(&m.doc, &["apiVersion"], &m.file);
        assert!(!api.is_empty(), "{}: empty apiVersion", m.file);
        assert!(!m.name().is_empty(), "{}: empty name", m.file);
        if m.kind() == "Namespace" {
            continue;
        }
        assert_eq!(
            text(&m.doc, &["metadata", "namespace"], &m.file),
            NAMESPACE,
            "{}: in the namespace the backend name spells",
            m.file
        );
    }
    find(&all, "Namespace", NAMESPACE);
}

#[test]
fn ports_are_the_listener_and_admin_ports_on_reachable_addresses() {
    let all = manifests();
    let config = embedded(&all).table;
    let listener = bind(listener(&config), "the listener's");
    let admin = admin_bind(&config);
    // A loopback bind passes --check, yet neither clients through the Service nor the
    // kubelet's probe could reach it.
    for (what, addr) in [("listener", listener), ("[admin]", admin)] {
        assert!(
            !addr.ip().is_loopback(),
            "the {what} binds {addr}: unreachable from outside the pod"
        );
    }
    let deployment = find(&all, "Deployment", WEIGHBRIDGE);
    let container = container(deployment);
    assert_eq!(
        container_ports(container, &deployment.file),
        BTreeSet::from([listener.port(), admin.port()]),
        "{}: container ports",
        deployment.file
    );

    // Each Service that selects the weighbridge pods sends to the listener or to the admin
    // port, and together they cover both.
    let mut targets = BTreeSet::new();
    for service in of_kind(&all, "Service") {
        let selector = at(&service.doc, &["spec", "selector"], &service.file);
        if selected(&all, selector) != [WEIGHBRIDGE] {
            continue;
        }
        for port in list(&service.doc, &["spec", "ports"], &service.file) {
            let target = port
                .get("targetPort")
                .unwrap_or_else(|| at(port, &["port"], &service.file));
            targets.insert(resolve_port(container, target, &service.file));
        }
    }
    assert_eq!(
        targets,
        BTreeSet::from([listener.port(), admin.port()]),
        "the Services' target ports are the listener's and the admin endpoint's"
    );
    let client = find(&all, "Service", WEIGHBRIDGE);
    let client_ports: Vec<u16> = list(&client.doc, &["spec", "ports"], &client.file)
        .iter()
        .map(|p| resolve_port(container, &p["targetPort"], &client.file))
        .collect();
    assert_eq!(
        client_ports,
        [listener.port()],
        "{}: clients reach the listener only",
        client.file
    );
}

#[test]
fn probes_ask_for_healthz_on_the_admin_port() {
    let all = manifests();
    let admin = admin_bind(&embedded(&all).table);
    let deployment = find(&all, "Deployment", WEIGHBRIDGE);
    let file = deployment.file.as_str();
    let container = container(deployment);
    for probe in ["readinessProbe", "livenessProbe"] {
        assert_eq!(
            text(container, &[probe, "httpGet", "path"], file),
            "/healthz",
            "{file}: {probe}"
        );
        let port = at(container, &[probe, "httpGet", "port"], file);
        assert_eq!(
            resolve_port(container, port, file),
            admin.port(),
            "{file}: {probe} port"
        );
    }
}

#[test]
fn the_grace_period_outlasts_the_prestop_sleep_and_shutdown_grace() {
    let all = manifests();
    let config = embedded(&all).table;
    let shutdown_grace = config
        .get("shutdown_grace")
        .map(|v| {
            let text = v.as_str().expect("shutdown_grace is a string");
            humantime::parse_duration(text)
                .unwrap_or_else(|e| panic!("shutdown_grace `{text}`: {e}"))
        })
        .unwrap_or(DEFAULT_SHUTDOWN_GRACE);
    let deployment = find(&all, "Deployment", WEIGHBRIDGE);
    let file = deployment.file.as_str();
    let grace = integer(
        &deployment.doc,
        &["spec", "template", "spec", "terminationGracePeriodSeconds"],
        file,
    );
    // The countdown starts before the preStop hook runs; SIGTERM comes after it.
    let pre_stop = container(deployment)
        .get("lifecycle")
        .and_then(|l| l.get("preStop"))
        .map_or(0, |hook| integer(hook, &["sleep", "seconds"], file));
    assert!(
        Duration::from_secs(grace) > Duration::from_secs(pre_stop) + shutdown_grace,
        "{file}: terminationGracePeriodSeconds {grace} must exceed the preStop sleep \
         ({pre_stop} s) plus shutdown_grace ({shutdown_grace:?}), or the kubelet kills streams \
         weighbridge would let finish"
    );
}

#[test]
fn a_rollout_starts_a_replica_before_it_stops_one() {
    let all = manifests();
    let deployment = find(&all, "Deployment", WEIGHBRIDGE);
    let file = deployment.file.as_str();
    let rolling = at(
        &deployment.doc,
        &["spec", "strategy", "rollingUpdate"],
        file,
    );
    assert_eq!(integer(rolling, &["maxUnavailable"], file), 0, "{file}");
    assert!(integer(rolling, &["maxSurge"], file) >= 1, "{file}");
    assert!(
        integer(&deployment.doc, &["spec", "replicas"], file) >= 2,
        "{file}: one replica would leave clients with nothing while it restarts"
    );
}

#[test]
fn threads_match_the_cpu_the_pod_requests() {
    let all = manifests();
    let config = embedded(&all).table;
    let deployment = find(&all, "Deployment", WEIGHBRIDGE);
    let file = deployment.file.as_str();
    let resources = at(container(deployment), &["resources"], file);
    // Without `threads`, weighbridge starts one worker per CPU it may use: the CPU limit if
    // there is one, else every core of the node, whatever the pod requests.
    let threads = config.get("threads").and_then(Toml::as_integer).expect(
        "the embedded config sets `threads`, so the worker count does not depend on the node",
    );
    let requested = cores(at(resources, &["requests", "cpu"], file), file);
    assert_eq!(
        threads as f64,
        requested.ceil(),
        "{file}: threads = {threads} against a CPU request of {requested}"
    );
    if let Some(limit) = resources.get("limits").and_then(|l| l.get("cpu")) {
        let limit = cores(limit, file);
        assert!(
            threads as f64 <= limit.ceil(),
            "{file}: {threads} threads under a CPU limit of {limit} are throttled"
        );
    }
}

#[test]
fn the_container_runs_unprivileged() {
    let all = manifests();
    let config = embedded(&all).table;
    let deployment = find(&all, "Deployment", WEIGHBRIDGE);
    let file = deployment.file.as_str();
    let pod = at(&deployment.doc, &["spec", "template", "spec"], file);
    let container = container(deployment);
    let security = |key: &str| {
        container
            .get("securityContext")
            .and_then(|s| s.get(key))
            .or_else(|| pod.get("securityContext").and_then(|s| s.get(key)))
    };
    assert_eq!(security("runAsNonRoot").and_then(Yaml::as_bool), Some(true));
    assert!(
        security("runAsUser")
            .and_then(Yaml::as_u64)
            .is_some_and(|uid| uid > 0),
        "{file}: a numeric, non-zero runAsUser, so runAsNonRoot can be verified"
    );
    let context = at(container, &["securityContext"], file);
    assert_eq!(context["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert_eq!(context["allowPrivilegeEscalation"].as_bool(), Some(false));
    let dropped: Vec<&str> = list(context, &["capabilities", "drop"], file)
        .iter()
        .filter_map(Yaml::as_str)
        .collect();
    assert_eq!(dropped, ["ALL"], "{file}: every capability dropped");
    let added: Vec<&str> = context["capabilities"]
        .get("add")
        .and_then(Yaml::as_sequence)
        .map(|a| a.iter().filter_map(Yaml::as_str).collect())
        .unwrap_or_default();
    // Without NET_BIND_SERVICE a non-root process cannot bind below 1024.
    let low = [
        bind(listener(&config), "the listener's").port(),
        admin_bind(&config).port(),
    ]
    .into_iter()
    .any(|port| port < 1024);
    assert_eq!(
        added.contains(&"NET_BIND_SERVICE"),
        low,
        "{file}: NET_BIND_SERVICE exactly when a port is below 1024; added: {added:?}"
    );
}

#[test]
fn selectors_match_the_pods_they_are_for() {
    let all = manifests();
    for deployment in of_kind(&all, "Deployment") {
        let selector = at(
            &deployment.doc,
            &["spec", "selector", "matchLabels"],
            &deployment.file,
        );
        assert!(
            selects(selector, pod_labels(deployment)),
            "{}: the selector does not match the pod labels",
            deployment.file
        );
        assert_eq!(
            selected(&all, selector),
            [deployment.name()],
            "{}: the selector also matches another Deployment's pods",
            deployment.file
        );
    }
    // Each Service and budget is for one Deployment: weighbridge's unless named after vLLM.
    let services = of_kind(&all, "Service").map(|s| (s, &["spec", "selector"][..]));
    let budgets =
        of_kind(&all, "PodDisruptionBudget").map(|b| (b, &["spec", "selector", "matchLabels"][..]));
    let mut checked = 0;
    for (manifest, path) in services.chain(budgets) {
        let selector = at(&manifest.doc, path, &manifest.file);
        let expected = if manifest.name().starts_with("vllm") {
            "vllm"
        } else {
            WEIGHBRIDGE
        };
        assert_eq!(
            selected(&all, selector),
            [expected],
            "{}: selects the wrong pods",
            manifest.file
        );
        checked += 1;
    }
    assert!(checked >= 3, "the Services were checked: {checked}");
}

#[test]
fn the_backend_is_the_headless_service_and_its_port_is_vllms() {
    let all = manifests();
    let config = embedded(&all).table;
    let listener = listener(&config);
    let pool = pool(&config, listener);
    let backends = pool["backend"]
        .as_array()
        .expect("the pool has [[pool.backend]] tables");
    assert_eq!(backends.len(), 1, "one backend entry: the fleet's name");
    let backend = backends[0].as_table().expect("a backend is a table");
    let addr = toml_str(backend, "addr");
    let (host, port) = addr
        .rsplit_once(':')
        .unwrap_or_else(|| panic!("backend `{addr}` has no port"));
    let port: u16 = port
        .parse()
        .unwrap_or_else(|e| panic!("backend `{addr}`: port: {e}"));
    let suffix = format!(".{NAMESPACE}.svc.cluster.local");
    let service_name = host.strip_suffix(&suffix).unwrap_or_else(|| {
        panic!("backend `{addr}` is not a Service of namespace {NAMESPACE}: <name>{suffix}")
    });

    let service = find(&all, "Service", service_name);
    let file = service.file.as_str();
    assert_eq!(
        text(&service.doc, &["spec", "clusterIP"], file),
        "None",
        "{file}: headless, so the name lists every pod rather than one virtual IP"
    );
    assert_ne!(
        service.doc["spec"]["publishNotReadyAddresses"].as_bool(),
        Some(true),
        "{file}: only ready pods belong in the name"
    );
    let selector = at(&service.doc, &["spec", "selector"], file);
    let fleet = selected(&all, selector);
    assert_eq!(fleet.len(), 1, "{file}: selects one Deployment: {fleet:?}");
    let deployment = find(&all, "Deployment", fleet[0]);
    let server = container(deployment);
    let server_ports = container_ports(server, &deployment.file);
    assert!(
        server_ports.contains(&port),
        "backend port {port} is not a port of {}: {server_ports:?}",
        deployment.file
    );
    // The records carry pod addresses: the port that matters is the container's, and the
    // Service's own port (in SRV records) says the same.
    for p in list(&service.doc, &["spec", "ports"], file) {
        assert_eq!(resolve_port(server, &p["targetPort"], file), port);
        assert_eq!(integer(p, &["port"], file), u64::from(port), "{file}: port");
    }
    let args = words(server, &deployment.file);
    assert_eq!(
        flag(&args, "--port"),
        Some(port.to_string().as_str()),
        "{}: vLLM serves on the backend's port",
        deployment.file
    );

    // weighbridge's health checks and the kubelet's readiness ask the same question.
    let health_path = pool
        .get("health")
        .and_then(|h| h.get("path"))
        .and_then(Toml::as_str)
        .unwrap_or("/health");
    assert_eq!(
        text(
            server,
            &["readinessProbe", "httpGet", "path"],
            &deployment.file
        ),
        health_path
    );

    // Slots: with reported load, what other replicas have open on a server counts against
    // each replica's max_connections, so it is the server's whole concurrency; without it,
    // each replica counts only its own connections and gets a share.
    let slots = backend
        .get("max_connections")
        .and_then(Toml::as_integer)
        .expect("the backend has max_connections");
    let concurrency: i64 = flag(&args, "--max-num-seqs")
        .expect("vLLM is started with --max-num-seqs")
        .parse()
        .expect("--max-num-seqs is a number");
    let load = pool.get("health").and_then(|h| h.get("load"));
    let reported = load.is_some_and(|l| {
        l.get("preset").is_some()
            || l.get("in_flight_metrics")
                .and_then(Toml::as_array)
                .is_some_and(|m| !m.is_empty())
    });
    if reported {
        assert_eq!(
            slots, concurrency,
            "max_connections against vLLM --max-num-seqs"
        );
    } else {
        let replicas = integer(
            &find(&all, "Deployment", WEIGHBRIDGE).doc,
            &["spec", "replicas"],
            "weighbridge Deployment",
        ) as i64;
        assert!(
            slots * replicas <= concurrency,
            "{replicas} replicas × max_connections {slots} overbook --max-num-seqs {concurrency}"
        );
    }
}

#[tokio::test]
async fn the_embedded_config_passes_check() {
    let all = manifests();
    let embedded = embedded(&all);
    let file = config_file(&embedded.text);
    let path = file.path().to_str().expect("utf-8 temp path");
    let output = run(&["--check", "--config", path]).await;
    assert!(
        output.status.success(),
        "weighbridge --check refuses the ConfigMap's config:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains(": ok: 1 listener(s)"), "{stdout}");
}
