//! Reading a stack manifest file (`stacks/*.toml`) into an [`ipc_spec::manifest::Manifest`],
//! checking it, and packing it for the boot bundle.
//!
//! The file format is documented in `stacks/README.md`; `stacks/demo.toml` is the default
//! stack. Every key is checked: an unknown key, a missing key, a value of the wrong type or
//! anything [`ipc_spec::manifest::validate`] rejects fails with a message that starts with the
//! file's path and names the field (`domain[1].image`, `channel[0].server`,
//! `machine.memory_mib`) and the problem. TOML errors also show the line and column.

use std::path::{Path, PathBuf};

use ipc_spec::manifest::{
    self, ChannelKind, ChannelSpec, DomainSpec, Field, Manifest, Problem, ProblemKind, MANIFEST_VERSION,
};
use serde::Deserialize;

/// The default stack, relative to the workspace root.
pub const DEFAULT_STACK: &str = "stacks/demo.toml";

/// The default stack's path.
pub fn default_stack_path() -> PathBuf {
    crate::workspace_root().join(DEFAULT_STACK)
}

/// The whole file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StackFile {
    machine: MachineSection,
    #[serde(default)]
    domain: Vec<DomainSection>,
    #[serde(default)]
    channel: Vec<ChannelSection>,
}

/// `[machine]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MachineSection {
    memory_mib: i64,
    /// The device dom0 drives as the host control interface (`"virtio-console"`).
    #[serde(default)]
    control: String,
}

/// One `[[domain]]`. Numbers are read as i64 so an out-of-range value gets the same message
/// as any other rule.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DomainSection {
    name: String,
    /// A VM with a `kernel` has no image.
    #[serde(default)]
    image: String,
    memory_mib: i64,
    priority: i64,
    #[serde(default = "one")]
    vcpus: i64,
    #[serde(default)]
    args: String,
    #[serde(default)]
    device: String,
    #[serde(default)]
    status: bool,
    /// Makes the domain a VM served by the named VMM domain.
    #[serde(default)]
    vmm: String,
    #[serde(default)]
    fuzz: bool,
    /// A Linux VM: kernel and initramfs (bundle entries, see `crate::linux::BUNDLE_FILES`) and
    /// the kernel's command line.
    #[serde(default)]
    kernel: String,
    #[serde(default)]
    initramfs: String,
    #[serde(default)]
    cmdline: String,
    /// The domain receives the console's typed input.
    #[serde(default)]
    console_input: bool,
    /// `"always"` or `"never"` (default).
    #[serde(default)]
    restart: Option<String>,
    #[serde(default)]
    restart_limit: Option<i64>,
    #[serde(default)]
    restart_window_ms: Option<i64>,
    #[serde(default)]
    restart_backoff_ms: Option<i64>,
    /// Hang watchdog period (0 or absent: none).
    #[serde(default)]
    watchdog_ms: Option<i64>,
}

fn one() -> i64 {
    1
}

/// One `[[channel]]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ChannelSection {
    name: String,
    #[serde(default)]
    kind: KindValue,
    client: String,
    server: String,
    /// Block channels: the shared region's size in KiB (default 1024).
    size_kib: Option<i64>,
}

/// `kind = "..."` of a channel.
#[derive(Deserialize, Default, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum KindValue {
    #[default]
    Endpoint,
    Notification,
    Block,
    Net,
}

impl From<KindValue> for ChannelKind {
    fn from(kind: KindValue) -> Self {
        match kind {
            KindValue::Endpoint => ChannelKind::Endpoint,
            KindValue::Notification => ChannelKind::Notification,
            KindValue::Block => ChannelKind::Block,
            KindValue::Net => ChannelKind::Net,
        }
    }
}

/// Reads, parses and validates the manifest file at `path`. `known_images` are the domain
/// images the build can pack (bundle entry names).
///
/// On failure the message has one line per problem, each `<path>: <field>: <problem>`; a
/// TOML or schema error is `<path>: [<field>: ]<the toml crate's message>`, which shows the
/// line, column and the offending key or value.
pub fn load(path: &Path, known_images: &[&str]) -> Result<Manifest, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("{}: cannot read the stack manifest: {e}", path.display()))?;
    parse(&text, known_images)
        .map_err(|problems| problems.iter().map(|p| format!("{}: {p}", path.display())).collect::<Vec<_>>().join("\n"))
}

/// Parses and validates manifest text; each error is `<field>: <problem>` (or the toml
/// crate's message alone when it has no field).
pub fn parse(text: &str, known_images: &[&str]) -> Result<Manifest, Vec<String>> {
    let file = parse_toml(text).map_err(|e| vec![e])?;
    let mut problems = Vec::new();
    let mut push = |field: Field, kind: ProblemKind| problems.push(Problem { field, kind });

    // Errors only this reader can meet, already described.
    let mut own = Vec::new();
    let machine_memory_mib = u32::try_from(file.machine.memory_mib).unwrap_or_else(|_| {
        own.push(format!(
            "machine.memory_mib: {} is not a memory size in MiB (0..={})",
            file.machine.memory_mib,
            u32::MAX
        ));
        u32::MAX
    });

    let mut domains = Vec::with_capacity(file.domain.len());
    for (index, d) in file.domain.into_iter().enumerate() {
        let field = |key| Field::Domain { index, key };
        // A value that does not fit its field is reported here and replaced by a valid
        // one, so that `validate` does not report it a second time.
        let memory_mib = u32::try_from(d.memory_mib).unwrap_or_else(|_| {
            push(field("memory_mib"), ProblemKind::MemoryOutOfRange { mib: d.memory_mib });
            manifest::MIN_DOMAIN_MEMORY_MIB
        });
        let priority = u8::try_from(d.priority).unwrap_or_else(|_| {
            push(field("priority"), ProblemKind::PriorityOutOfRange { priority: d.priority });
            manifest::MIN_PRIORITY
        });
        let vcpus = u8::try_from(d.vcpus).unwrap_or_else(|_| {
            push(field("vcpus"), ProblemKind::UnsupportedVcpus { vcpus: d.vcpus });
            manifest::SUPPORTED_VCPUS
        });
        let mut restart = manifest::RestartPolicy::default();
        match d.restart.as_deref() {
            None | Some("never") => {}
            Some("always") => restart.mode = manifest::Restart::Always,
            Some(other) => push(
                field("restart"),
                ProblemKind::BadRestart { what: format!("\"{other}\" is neither \"always\" nor \"never\"") },
            ),
        }
        // Out-of-range numbers become u32::MAX, which `validate` reports with the field.
        let number = |v: Option<i64>, default: u32| v.map_or(default, |v| u32::try_from(v).unwrap_or(u32::MAX));
        restart.limit = number(d.restart_limit, restart.limit);
        restart.window_ms = number(d.restart_window_ms, restart.window_ms);
        restart.backoff_ms = number(d.restart_backoff_ms, restart.backoff_ms);
        restart.watchdog_ms = number(d.watchdog_ms, restart.watchdog_ms);
        domains.push(DomainSpec {
            name: d.name,
            image: d.image,
            memory_mib,
            priority,
            vcpus,
            args: d.args,
            device: d.device,
            status: d.status,
            vmm: d.vmm,
            fuzz: d.fuzz,
            kernel: d.kernel,
            initramfs: d.initramfs,
            cmdline: d.cmdline,
            console_input: d.console_input,
            restart,
        });
    }

    let channels = file
        .channel
        .into_iter()
        .map(|c| {
            let kind: ChannelKind = c.kind.into();
            let size_kib = match (kind, c.size_kib) {
                (ChannelKind::Block | ChannelKind::Net, None) => ipc_spec::manifest::DEFAULT_BLOCK_REGION_KIB,
                (_, Some(k)) => u32::try_from(k).unwrap_or(u32::MAX),
                (_, None) => 0,
            };
            ChannelSpec { name: c.name, kind, client: c.client, server: c.server, size_kib }
        })
        .collect();

    let manifest =
        Manifest { version: MANIFEST_VERSION, machine_memory_mib, domains, channels, control: file.machine.control };
    if let Err(more) = manifest::validate(&manifest, known_images) {
        problems.extend(more);
    }
    if problems.is_empty() && own.is_empty() {
        Ok(manifest)
    } else {
        own.extend(problems.iter().map(describe));
        Err(own)
    }
}

/// Deserializes the TOML text, naming the field of a schema error.
fn parse_toml(text: &str) -> Result<StackFile, String> {
    let deserializer = toml::Deserializer::parse(text).map_err(|e| e.to_string().trim_end().to_owned())?;
    serde_path_to_error::deserialize(deserializer).map_err(|e| {
        // The path is written like ours (`domain[1].colour`), or `.` for the top level.
        let path = e.path().to_string();
        let message = e.into_inner().to_string();
        let message = message.trim_end();
        if path.is_empty() || path == "." {
            message.to_owned()
        } else {
            format!("{path}: {message}")
        }
    })
}

/// `<field>: <problem>` with the field named as in the file.
fn describe(problem: &Problem) -> String {
    let field = match problem.field {
        Field::Version => "version".to_owned(),
        Field::MachineMemoryMib => "machine.memory_mib".to_owned(),
        Field::Domains => "domain".to_owned(),
        Field::Control => "machine.control".to_owned(),
        Field::Domain { index, key } => format!("domain[{index}].{key}"),
        Field::Channel { index, key } => format!("channel[{index}].{key}"),
    };
    let message = match &problem.kind {
        ProblemKind::NoDomains => "at least one [[domain]] is required".to_owned(),
        kind => kind.to_string(),
    };
    format!("{field}: {message}")
}

/// Encodes a manifest for the boot bundle entry [`ipc_spec::manifest::MANIFEST_ENTRY`].
pub fn pack(manifest: &Manifest) -> Vec<u8> {
    // postcard writing a plain struct into a Vec cannot fail.
    manifest::encode(manifest).expect("encoding a manifest into memory")
}

/// The images the manifest's domains use, each once, in order of first use.
pub fn images(manifest: &Manifest) -> Vec<&str> {
    let mut images: Vec<&str> = Vec::new();
    for d in &manifest.domains {
        for file in [&d.image, &d.kernel, &d.initramfs] {
            if !file.is_empty() && !images.contains(&file.as_str()) {
                images.push(file);
            }
        }
    }
    images
}

#[cfg(test)]
mod tests {
    use super::*;

    const IMAGES: &[&str] = &["ipc-client", "ipc-server"];

    const GOOD: &str = r#"
[machine]
memory_mib = 512

[[domain]]
name = "pong"
image = "ipc-server"
memory_mib = 4
priority = 10

[[domain]]
name = "ping"
image = "ipc-client"
memory_mib = 4
priority = 10
vcpus = 1
args = "rounds=3"

[[channel]]
name = "ping-pong"
kind = "endpoint"
client = "ping"
server = "pong"
"#;

    /// Writes `text` to a file of its own in the temp directory, loads it, removes it.
    /// Returns the result and the file's path as shown in messages.
    fn load_text(test: &str, text: &str) -> (Result<Manifest, String>, String) {
        let path = std::env::temp_dir().join(format!("xtask-manifest-{}-{test}.toml", std::process::id()));
        std::fs::write(&path, text).unwrap();
        let result = load(&path, IMAGES);
        std::fs::remove_file(&path).unwrap();
        (result, path.display().to_string())
    }

    /// Loads `text` and checks that it fails with a message that starts with the file's
    /// path and holds `field` and every one of `problem`.
    fn assert_fails(test: &str, text: &str, field: &str, problem: &[&str]) {
        let (result, path) = load_text(test, text);
        let message = match result {
            Ok(m) => panic!("{test}: accepted: {m:?}"),
            Err(e) => e,
        };
        assert!(message.starts_with(&format!("{path}: ")), "{test}: {message}");
        assert!(message.contains(&format!("{field}: ")), "{test}: {message}");
        for p in problem {
            assert!(message.contains(p), "{test}: {p:?} not in: {message}");
        }
    }

    /// GOOD with the first occurrence of `from` replaced by `to`.
    fn good_with(from: &str, to: &str) -> String {
        assert!(GOOD.contains(from), "{from}");
        GOOD.replacen(from, to, 1)
    }

    #[test]
    fn restart_policy_is_read_and_checked() {
        let with = |extra: &str| GOOD.replacen("priority = 10\n", &format!("priority = 10\n{extra}\n"), 1);
        let m = parse(&with("restart = \"always\"\nrestart_limit = 3\nrestart_backoff_ms = 5"), IMAGES).unwrap();
        let r = m.domains[0].restart;
        assert_eq!((r.mode, r.limit, r.window_ms, r.backoff_ms), (manifest::Restart::Always, 3, 10_000, 5));
        assert_eq!(parse(GOOD, IMAGES).unwrap().domains[0].restart, manifest::RestartPolicy::default());
        let e = parse(&with("restart = \"sometimes\""), IMAGES).unwrap_err();
        assert!(e[0].starts_with("domain[0].restart: ") && e[0].contains("\"sometimes\""), "{e:?}");
        let e = parse(&with("restart = \"always\"\nrestart_limit = 0"), IMAGES).unwrap_err();
        assert!(e[0].starts_with("domain[0].restart_limit: "), "{e:?}");
        let e = parse(&with("restart_window_ms = -1"), IMAGES).unwrap_err();
        assert!(e[0].starts_with("domain[0].restart_window_ms: "), "{e:?}");
        let e = parse(&with("restart_backoff_ms = 60001"), IMAGES).unwrap_err();
        assert!(e[0].starts_with("domain[0].restart_backoff_ms: "), "{e:?}");
        let m = parse(&with("watchdog_ms = 50"), IMAGES).unwrap();
        assert_eq!(m.domains[0].restart.watchdog_ms, 50);
        let e = parse(&with("watchdog_ms = 5"), IMAGES).unwrap_err();
        assert!(e[0].starts_with("domain[0].watchdog_ms: "), "{e:?}");
    }

    #[test]
    fn control_device_is_read_and_checked() {
        assert_eq!(parse(GOOD, IMAGES).unwrap().control, "");
        let with = |v: &str| GOOD.replacen("[machine]\n", &format!("[machine]\ncontrol = \"{v}\"\n"), 1);
        assert_eq!(parse(&with("virtio-console"), IMAGES).unwrap().control, "virtio-console");
        let e = parse(&with("virtio-gpu"), IMAGES).unwrap_err();
        assert!(e[0].starts_with("machine.control: ") && e[0].contains("virtio-gpu"), "{e:?}");
    }

    #[test]
    fn good_manifest_round_trips() {
        let (result, _) = load_text("good", GOOD);
        let m = result.unwrap();
        assert_eq!(m.version, MANIFEST_VERSION);
        assert_eq!(m.machine_memory_mib, 512);
        assert_eq!(m.domains.len(), 2);
        assert_eq!(m.domains[0].name, "pong");
        assert_eq!(m.domains[0].vcpus, 1, "vcpus defaults to 1");
        assert_eq!(m.domains[0].args, "", "args defaults to empty");
        assert_eq!(m.domains[1].args, "rounds=3");
        assert_eq!(m.channels[0].kind, ChannelKind::Endpoint);
        assert_eq!(m.channels[0].client, "ping");
        let bytes = pack(&m);
        assert_eq!(manifest::decode(&bytes).unwrap(), m);
        assert_eq!(images(&m), ["ipc-server", "ipc-client"]);
    }

    #[test]
    fn channel_kind_defaults_to_endpoint() {
        let (result, _) = load_text("kind-default", &good_with("kind = \"endpoint\"\n", ""));
        assert_eq!(result.unwrap().channels[0].kind, ChannelKind::Endpoint);
    }

    #[test]
    fn demo_stack_is_valid() {
        let m = load(&default_stack_path(), &crate::build::known_images()).unwrap();
        let names: Vec<&str> = m.domains.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["disk", "net", "guest"]);
        assert_eq!(m.domain("disk").unwrap().device, "virtio-blk");
        assert_eq!(m.domain("net").unwrap().device, "virtio-net");
        assert_eq!(m.channels[0].kind, ChannelKind::Block);
        assert_eq!(m.channels[0].size_kib, 1024);
        assert_eq!((m.channels[1].kind, m.channels[1].size_kib), (ChannelKind::Net, 520));
        assert_eq!(manifest::decode(&pack(&m)).unwrap(), m);
    }

    #[test]
    fn ipc_stack_is_valid() {
        let m = load(&crate::workspace_root().join("tests/stacks/ipc.toml"), IMAGES).unwrap();
        assert_eq!(m.machine_memory_mib, 512);
        let names: Vec<&str> = m.domains.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["pong", "ping"]);
        assert_eq!(m.domain("pong").unwrap().image, "ipc-server");
        assert_eq!(m.domain("ping").unwrap().image, "ipc-client");
        assert!(m.domains.iter().all(|d| d.priority == 10 && d.memory_mib == 4));
        assert_eq!(m.channels.len(), 1);
        assert_eq!(m.channels[0].name, "ping-pong");
        assert_eq!(m.channels[0].kind, ChannelKind::Endpoint);
        assert_eq!((m.channels[0].client.as_str(), m.channels[0].server.as_str()), ("ping", "pong"));
        assert_eq!(manifest::decode(&pack(&m)).unwrap(), m);
    }

    #[test]
    fn every_stack_in_the_tree_is_valid() {
        for dir in ["stacks", "tests/stacks"] {
            for entry in std::fs::read_dir(crate::workspace_root().join(dir)).unwrap() {
                let path = entry.unwrap().path();
                if path.extension().is_some_and(|e| e == "toml") {
                    load(&path, &crate::build::known_images()).unwrap();
                }
            }
        }
    }

    #[test]
    fn unknown_image() {
        assert_fails(
            "unknown-image",
            &good_with("image = \"ipc-client\"", "image = \"foo\""),
            "domain[1].image",
            &["unknown image \"foo\" (known images: ipc-client, ipc-server)"],
        );
    }

    #[test]
    fn duplicate_domain_name() {
        assert_fails(
            "duplicate-domain",
            &good_with("name = \"ping\"", "name = \"pong\""),
            "domain[1].name",
            &["duplicate name \"pong\""],
        );
    }

    #[test]
    fn duplicate_channel_name() {
        let text = format!("{GOOD}\n[[channel]]\nname = \"ping-pong\"\nclient = \"pong\"\nserver = \"ping\"\n");
        assert_fails("duplicate-channel", &text, "channel[1].name", &["duplicate name \"ping-pong\""]);
    }

    #[test]
    fn channel_to_a_missing_domain() {
        assert_fails(
            "missing-server",
            &good_with("server = \"pong\"", "server = \"pang\""),
            "channel[0].server",
            &["no domain named \"pang\""],
        );
        assert_fails(
            "missing-client",
            &good_with("client = \"ping\"", "client = \"dom0\""),
            "channel[0].client",
            &["no domain named \"dom0\"", "dom0 is the builder"],
        );
        assert_fails(
            "same-ends",
            &good_with("client = \"ping\"", "client = \"pong\""),
            "channel[0].server",
            &["client and server are both \"pong\""],
        );
    }

    #[test]
    fn memory_larger_than_the_machine() {
        assert_fails(
            "machine-too-small",
            &good_with("memory_mib = 512", "memory_mib = 70"),
            "machine.memory_mib",
            &["8 MiB + 64 MiB reserved", "= 72 MiB", "machine's 70 MiB"],
        );
        let text =
            good_with("memory_mib = 512", "memory_mib = 1024").replacen("memory_mib = 4", "memory_mib = 1000", 1);
        assert_fails("domains-too-large", &text, "machine.memory_mib", &["1004 MiB + 64 MiB", "machine's 1024 MiB"]);
        assert_fails(
            "domain-too-large",
            &good_with("memory_mib = 4", "memory_mib = 2048"),
            "domain[0].memory_mib",
            &["2048 MiB is out of range", "between 1 and 1024 MiB"],
        );
        assert_fails(
            "negative-memory",
            &good_with("memory_mib = 4", "memory_mib = -4"),
            "domain[0].memory_mib",
            &["-4 MiB is out of range"],
        );
        assert_fails(
            "machine-memory-huge",
            &good_with("memory_mib = 512", "memory_mib = 99999999999"),
            "machine.memory_mib",
            &["99999999999 is not a memory size in MiB"],
        );
    }

    #[test]
    fn unknown_key_at_top_level() {
        let text = format!("colour = \"blue\"\n{GOOD}");
        assert_fails("unknown-top", &text, "colour", &["unknown field `colour`", "line 1, column 1"]);
        let text = format!("{GOOD}\n[[device]]\nname = \"disk\"\n");
        assert_fails("unknown-table", &text, "device", &["unknown field `device`"]);
    }

    #[test]
    fn unknown_key_inside_a_domain() {
        assert_fails(
            "unknown-domain-key",
            &good_with("vcpus = 1\n", "vcpus = 1\ncolour = 3\n"),
            "domain[1].colour",
            &["unknown field `colour`", "line 17, column 1"],
        );
        assert_fails(
            "unknown-machine-key",
            &good_with("memory_mib = 512\n", "memory_mib = 512\ncpus = 2\n"),
            "machine.cpus",
            &["unknown field `cpus`"],
        );
        assert_fails(
            "unknown-channel-key",
            &good_with("kind = \"endpoint\"\n", "kind = \"endpoint\"\nbadge = 3\n"),
            "channel[0].badge",
            &["unknown field `badge`"],
        );
    }

    #[test]
    fn bad_values_in_the_schema() {
        assert_fails(
            "unknown-kind",
            &good_with("kind = \"endpoint\"", "kind = \"pipe\""),
            "channel[0].kind",
            &["unknown variant `pipe`, expected one of `endpoint`, `notification`, `block`"],
        );
        assert_fails(
            "wrong-type",
            &good_with("priority = 10", "priority = \"high\""),
            "domain[0].priority",
            &["invalid type: string \"high\""],
        );
        assert_fails(
            "missing-image",
            &good_with("image = \"ipc-server\"\n", ""),
            "domain[0].image",
            &["a domain needs an image (or, as a VM, a kernel)"],
        );
        assert_fails("missing-key", &good_with("memory_mib = 4\n", ""), "domain[0]", &["missing field `memory_mib`"]);
    }

    #[test]
    fn bad_priority() {
        for (value, needle) in [
            ("0", "priority 0 is out of range 1..=254 (0 is reserved for the idle loop)"),
            ("255", "255 is reserved for the microvisor's own use"),
            ("300", "priority 300 is out of range 1..=254"),
            ("-1", "priority -1 is out of range 1..=254"),
        ] {
            assert_fails(
                &format!("priority{value}"),
                &good_with("priority = 10", &format!("priority = {value}")),
                "domain[0].priority",
                &[needle],
            );
        }
    }

    #[test]
    fn reserved_name_dom0() {
        assert_fails(
            "reserved-name",
            &good_with("name = \"pong\"", "name = \"dom0\"").replace("server = \"pong\"", "server = \"dom0\""),
            "domain[0].name",
            &["\"dom0\" is reserved"],
        );
    }

    #[test]
    fn other_rules() {
        assert_fails(
            "vcpus",
            &good_with("vcpus = 1", "vcpus = 2"),
            "domain[1].vcpus",
            &["only 1 vCPU per domain is supported yet"],
        );
        assert_fails("bad-name", &good_with("name = \"ping\"", "name = \"Ping\""), "domain[1].name", &["contains 'P'"]);
        let long_args = format!("args = \"{}\"", "x".repeat(201));
        assert_fails(
            "long-args",
            &good_with("args = \"rounds=3\"", &long_args),
            "domain[1].args",
            &["201 bytes long; at most 200"],
        );
        assert_fails("no-domains", "[machine]\nmemory_mib = 512\n", "domain", &["at least one [[domain]] is required"]);
        assert_fails("syntax", "[machine\n", "", &["line 1, column 9", "unclosed table"]);
    }

    #[test]
    fn every_problem_is_reported_on_its_own_line() {
        let text = good_with("image = \"ipc-client\"", "image = \"foo\"").replacen("priority = 10", "priority = 0", 1);
        let (result, path) = load_text("many", &text);
        let message = result.unwrap_err();
        let lines: Vec<&str> = message.lines().collect();
        assert_eq!(lines.len(), 2, "{message}");
        assert!(lines.iter().all(|l| l.starts_with(&format!("{path}: "))));
        assert!(lines[0].contains("domain[0].priority: "));
        assert!(lines[1].contains("domain[1].image: "));
    }

    #[test]
    fn missing_file() {
        let path = std::env::temp_dir().join("xtask-manifest-does-not-exist.toml");
        let message = load(&path, IMAGES).unwrap_err();
        assert!(message.starts_with(&format!("{}: cannot read", path.display())));
    }
}
