//! First-pass throughput of real migrations of guest memory loaded from the data sets.
//!
//! Each row: a source `ferry run --memory SIZE,mem-path=IMAGE,share=off --workload
//! working-set=0` (an idle guest whose memory is the image, except the first 2 MiB the test
//! guest boots from), a destination `ferry run --memory SIZE[,prealloc=on] --incoming defer
//! -S`, both given the row's multifd settings; then `migrate-incoming` on the destination
//! and at once `migrate` on the source with max-bandwidth 0 (unlimited) and the `events`
//! capability. The first pass lasts from the source's `MIGRATION {"status": "active"}` event
//! to its first `MIGRATION_PASS` event (QMP timestamps, microseconds). Afterwards the
//! source's and the destination's memory digests must match.

use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;
use serde_json::{json, Value};

use super::data::DataSet;
use super::tcp::{self, TcpFigure};
use super::tls::TlsCreds;
use super::{event_seconds, BenchEnv, BenchError, QemuReference};

/// A migration configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Its name in the report.
    pub name: &'static str,
    /// Multifd channels and compression (None: plain, one stream).
    pub multifd: Option<(u8, &'static str)>,
    /// Legacy `compress` threads (zlib level 1 on the main stream).
    pub compress: Option<u8>,
    /// Main stream and every channel over TLS (certificates made at run time, see
    /// [`super::tls`]).
    pub tls: bool,
    /// Multifd pages sent with MSG_ZEROCOPY (`zero-copy-send` on the source).
    pub zero_copy: bool,
}

impl Config {
    /// Streams on the wire (for the TCP reference).
    pub fn streams(&self) -> usize {
        self.multifd.map_or(1, |(n, _)| usize::from(n))
    }

    /// Whether pages go as they are (no compression, no TLS): the rows the memory-bound TCP
    /// reference with the same number of streams applies to.
    pub fn moves_pages_as_they_are(&self) -> bool {
        self.compress.is_none() && !self.tls && matches!(self.multifd, None | Some((_, "none")))
    }

    /// Whether the row needs capabilities or parameters on both sides.
    fn special(&self) -> bool {
        self.multifd.is_some() || self.compress.is_some() || self.tls
    }

    /// The destination's capabilities.
    fn caps(&self) -> Vec<(&'static str, bool)> {
        match (self.multifd, self.compress) {
            (Some(_), _) => vec![("multifd", true)],
            (None, Some(_)) => vec![("compress", true)],
            (None, None) => Vec::new(),
        }
    }

    /// The source's capabilities: the destination's, and zero-copy send.
    fn source_caps(&self) -> Vec<(&'static str, bool)> {
        let mut caps = self.caps();
        if self.zero_copy {
            caps.push(("zero-copy-send", true));
        }
        caps
    }

    /// The configuration a zero-copy row is compared with (the same, copying).
    pub fn without_zero_copy(&self) -> Option<&'static str> {
        self.zero_copy.then_some("multifd-2")
    }

    /// The same configuration without TLS (the reference of a TLS row).
    pub fn without_tls(&self) -> Option<&'static str> {
        match (self.tls, self.multifd) {
            (false, _) => None,
            (true, None) => Some("plain"),
            (true, Some(_)) => Some("multifd-2"),
        }
    }

    fn params(&self) -> Value {
        if let Some(n) = self.compress {
            return json!({"compress-threads": n, "compress-level": 1, "decompress-threads": 2});
        }
        match self.multifd {
            None => json!({}),
            Some((n, comp)) => {
                let mut p = json!({"multifd-channels": n, "multifd-compression": comp});
                match comp {
                    "zstd" => p["multifd-zstd-level"] = json!(1),
                    "zlib" => p["multifd-zlib-level"] = json!(1),
                    _ => {}
                }
                p
            }
        }
    }
}

/// Every configuration the benchmark knows (the first seven run by default).
pub const CONFIGS: [Config; 10] = [
    Config {
        name: "plain",
        multifd: None,
        compress: None,
        tls: false,
        zero_copy: false,
    },
    Config {
        name: "multifd-2",
        multifd: Some((2, "none")),
        compress: None,
        tls: false,
        zero_copy: false,
    },
    Config {
        name: "multifd-4",
        multifd: Some((4, "none")),
        compress: None,
        tls: false,
        zero_copy: false,
    },
    Config {
        name: "zstd-1",
        multifd: Some((2, "zstd")),
        compress: None,
        tls: false,
        zero_copy: false,
    },
    Config {
        name: "zlib-1",
        multifd: Some((2, "zlib")),
        compress: None,
        tls: false,
        zero_copy: false,
    },
    Config {
        name: "compress-1",
        multifd: None,
        compress: Some(1),
        tls: false,
        zero_copy: false,
    },
    Config {
        name: "compress-2",
        multifd: None,
        compress: Some(2),
        tls: false,
        zero_copy: false,
    },
    Config {
        name: "tls",
        multifd: None,
        compress: None,
        tls: true,
        zero_copy: false,
    },
    Config {
        name: "multifd-2-tls",
        multifd: Some((2, "none")),
        compress: None,
        tls: true,
        zero_copy: false,
    },
    Config {
        name: "multifd-2-zc",
        multifd: Some((2, "none")),
        compress: None,
        tls: false,
        zero_copy: true,
    },
];

/// Configurations run when none is named.
const DEFAULT_CONFIGS: usize = 7;

/// The configurations named (the first seven when none is); a TLS configuration brings
/// its configuration without TLS along (first), for the ratio.
pub fn configs(names: &[String]) -> Result<Vec<Config>, String> {
    if names.is_empty() {
        return Ok(CONFIGS[..DEFAULT_CONFIGS].to_vec());
    }
    let named: Vec<Config> = names
        .iter()
        .map(|n| {
            CONFIGS
                .iter()
                .find(|c| c.name == n)
                .cloned()
                .ok_or_else(|| {
                    format!(
                        "--configs: unknown '{n}' (known: {})",
                        CONFIGS.map(|c| c.name).join(",")
                    )
                })
        })
        .collect::<Result<_, _>>()?;
    let mut out: Vec<Config> = Vec::new();
    for c in named {
        let base = c
            .without_tls()
            .or_else(|| c.without_zero_copy())
            .and_then(|b| CONFIGS.iter().find(|x| x.name == b));
        for x in base.into_iter().chain([&c]) {
            if !out.contains(x) {
                out.push(x.clone());
            }
        }
    }
    Ok(out)
}

/// A destination kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dest {
    /// Its name in the report.
    pub name: &'static str,
    /// What it adds to `--memory SIZE`.
    pub memory_suffix: &'static str,
    /// Environment of the destination process.
    pub env: &'static [(&'static str, &'static str)],
}

/// Every destination the benchmark knows: fresh memory (populated ahead of the receiver,
/// Ferry's default), preallocated memory, fresh anonymous memory with transparent huge
/// pages, and fresh memory populated by one thread, by two, or not at all (to measure the
/// populate).
pub const DESTS: [Dest; 6] = [
    Dest {
        name: "fresh",
        memory_suffix: "",
        env: &[],
    },
    Dest {
        name: "prealloc",
        memory_suffix: ",prealloc=on",
        env: &[],
    },
    Dest {
        name: "thp",
        memory_suffix: ",backend=anon,hugepages=thp",
        env: &[],
    },
    Dest {
        name: "fresh-1t",
        memory_suffix: "",
        env: &[(crate::app::POPULATE_ENV, "1")],
    },
    Dest {
        name: "fresh-2t",
        memory_suffix: "",
        env: &[(crate::app::POPULATE_ENV, "2")],
    },
    Dest {
        name: "fresh-nopop",
        memory_suffix: "",
        env: &[(crate::app::POPULATE_ENV, "off")],
    },
];

/// The stream count of the memory-bound TCP reference that applies to the configuration
/// named `name`, if one does (see [`Config::moves_pages_as_they_are`]).
pub fn memory_reference_streams(name: &str) -> Option<usize> {
    CONFIGS
        .iter()
        .find(|c| c.name == name && c.moves_pages_as_they_are())
        .map(Config::streams)
}

/// The destinations named (fresh and prealloc when none is).
pub fn dests(names: &[String]) -> Result<Vec<Dest>, String> {
    if names.is_empty() {
        return Ok(DESTS[..2].to_vec());
    }
    names
        .iter()
        .map(|n| {
            DESTS.iter().find(|d| d.name == n).cloned().ok_or_else(|| {
                format!(
                    "--dest: unknown '{n}' (known: {})",
                    DESTS.map(|d| d.name).join(",")
                )
            })
        })
        .collect()
}

/// What one row measured.
#[derive(Debug, Clone, Serialize)]
pub struct Measured {
    /// First pass, seconds (best run).
    pub first_pass_s: f64,
    /// Guest memory moved per second in the first pass, GiB/s.
    pub guest_gib_per_s: f64,
    /// Bytes on the wire (the whole migration; the guest is idle, so almost all first pass).
    pub wire_bytes: u64,
    /// Wire bytes per second of the first pass, GiB/s.
    pub wire_gib_per_s: f64,
    /// The TCP reference with the same number of streams, GiB/s.
    pub tcp_gib_per_s: Option<f64>,
    /// wire / TCP.
    pub wire_vs_tcp: Option<f64>,
    /// guest memory / TCP (above 1 when zero pages or compression save bytes).
    pub guest_vs_tcp: Option<f64>,
    /// query-migrate's total-time, ms.
    pub total_time_ms: u64,
    /// query-migrate's downtime, ms.
    pub downtime_ms: u64,
    /// Pages sent with data.
    pub normal_pages: u64,
    /// Zero pages (sent as flags).
    pub zero_pages: u64,
    /// Bytes on multifd channels.
    pub multifd_bytes: u64,
    /// CPU time of the source process during the migration, seconds per GiB of guest memory.
    pub source_cpu_s_per_gib: Option<f64>,
    /// CPU time of the destination process from migrate-incoming to the end, seconds per
    /// GiB of guest memory (includes populating ahead of the receiver; not `prealloc=on`,
    /// which happens at start).
    pub dest_cpu_s_per_gib: Option<f64>,
    /// The destination's own line about populating its memory ahead of the receiver.
    pub dest_populate: Option<String>,
    /// Source and destination memory digests are equal.
    pub digests_match: bool,
    /// Guest GiB/s of every run.
    pub runs_guest_gib_per_s: Vec<f64>,
    /// The best run's timeline, for `--report` charts (not in the JSON output).
    #[serde(skip)]
    pub timeline: Option<migration::timeline::Timeline>,
}

/// One row of the throughput table.
#[derive(Debug, Clone, Serialize)]
pub struct ThroughputRow {
    /// "mixed" or "random".
    pub data_set: String,
    /// Configuration name.
    pub config: String,
    /// Destination kind.
    pub dest: String,
    /// The figures, when the row ran.
    pub measured: Option<Measured>,
    /// Why not, when it did not.
    pub unavailable: Option<String>,
}

impl ThroughputRow {
    /// The figures, when the row ran.
    pub fn ok(&self) -> Option<&Measured> {
        self.measured.as_ref()
    }
}

/// A row that could not produce figures: the configuration is not available in this
/// build, or the migration failed.
enum RowError {
    Unavailable(String),
    Bench(BenchError),
}

impl From<BenchError> for RowError {
    fn from(e: BenchError) -> Self {
        RowError::Bench(e)
    }
}

struct OneRun {
    src_cpu: Option<f64>,
    dst_cpu: Option<f64>,
    first_pass_s: f64,
    info: Value,
    populate: Option<String>,
    digests_match: bool,
    timeline: Option<Value>,
}

fn one_run(
    env: &BenchEnv,
    data: &DataSet,
    memory: u64,
    config: &Config,
    dest: &Dest,
    tls: Option<&TlsCreds>,
) -> Result<OneRun, RowError> {
    let mib = memory >> 20;
    let mut src_args: Vec<String> = vec![
        "--memory".into(),
        format!("{mib}M,mem-path={},share=off", data.path.display()),
        "--vcpus".into(),
        "1".into(),
        "--workload".into(),
        "working-set=0".into(),
    ];
    let mut dst_args: Vec<String> = vec![
        "--memory".into(),
        format!("{mib}M{}", dest.memory_suffix),
        "--vcpus".into(),
        "1".into(),
        "--incoming".into(),
        "defer".into(),
        "-S".into(),
    ];
    let tls = if config.tls {
        let c = tls.ok_or_else(|| RowError::Unavailable("no TLS credentials".into()))?;
        src_args.extend(c.source_args());
        dst_args.extend(c.dest_args());
        Some(c)
    } else {
        None
    };
    let mut src = env.spawn(env.source_host(), "source", &src_args, &[])?;
    let mut caps = vec![("events", true)];
    caps.extend(config.source_caps());
    let mut params = config.params();
    params["max-bandwidth"] = json!(0);
    if tls.is_some() {
        TlsCreds::source_params(&mut params);
    }
    let set = src
        .set_caps(&caps)
        .and_then(|_| src.set_params(params.clone()));
    if let (Err(e), true) = (&set, config.special()) {
        return Err(RowError::Unavailable(format!("the source refuses it: {e}")));
    }
    set?;
    let mut dst = env.spawn(env.dest_host(), "destination", &dst_args, dest.env)?;
    let mut dst_params = config.params();
    if tls.is_some() {
        TlsCreds::dest_params(&mut dst_params);
    }
    if config.special() {
        dst.set_caps(&config.caps())
            .and_then(|_| dst.set_params(dst_params.clone()))
            .map_err(|e| RowError::Unavailable(format!("the destination refuses it: {e}")))?;
    }
    let addr = env.dest_addr();
    let dst_cpu0 = dst.cpu_seconds();
    dst.cmd("migrate-incoming", json!({"uri": format!("tcp:{addr}:0")}))?;
    let port = dst.query_migrate()?["socket-address"][0]["port"]
        .as_str()
        .and_then(|p| p.parse::<u16>().ok())
        .ok_or_else(|| {
            BenchError::Failed("the destination does not say which port it listens on".into())
        })?;
    let uri = format!("tcp:{addr}:{port}");
    env.note_command(format!(
        "QMP source: migrate-set-capabilities {}; migrate-set-parameters {params}; migrate {{\"uri\": \"tcp:{addr}:PORT\"}} (PORT: the destination's, from its query-migrate)",
        json!(caps.iter().map(|(c, s)| json!({"capability": c, "state": s})).collect::<Vec<_>>())
    ));
    if config.special() {
        env.note_command(format!(
            "QMP destination: migrate-set-capabilities {:?}; migrate-set-parameters {dst_params}; migrate-incoming {{\"uri\": \"tcp:{addr}:0\"}}",
            config.caps().iter().map(|c| c.0).collect::<Vec<_>>(),
        ));
    } else {
        env.note_command(format!(
            "QMP destination: migrate-incoming {{\"uri\": \"tcp:{addr}:0\"}}"
        ));
    }
    let timeout = Duration::from_secs(if env.quick { 120 } else { 600 });
    let src_cpu0 = src.cpu_seconds();
    src.cmd("migrate", json!({ "uri": uri }))?;
    let info = src.wait_migration_end(timeout, Duration::from_millis(100))?;
    let timeline = src.cmd("ferry-query-migrate-timeline", json!({})).ok();
    let src_cpu = src.cpu_seconds().zip(src_cpu0).map(|(b, a)| b - a);
    if info["status"] != "completed" {
        let why = info["error-desc"]
            .as_str()
            .unwrap_or("no error-desc")
            .to_string();
        return Err(match config.special() {
            true => RowError::Unavailable(format!("the migration failed: {why}")),
            false => RowError::Bench(BenchError::Failed(format!(
                "the migration failed: {why}\ndestination log:\n{}",
                dst.log()
            ))),
        });
    }
    if config.multifd.is_some() && info["ram"]["multifd-bytes"].as_u64().unwrap_or(0) == 0 {
        return Err(RowError::Unavailable(
            "the migration ran on the main stream only (this build has no multifd)".into(),
        ));
    }
    if config.compress.is_some() && info["compression"]["pages"].as_u64().unwrap_or(0) == 0 {
        return Err(RowError::Unavailable(
            "no page went compressed (this build has no legacy compress)".into(),
        ));
    }
    let events = src.take_events();
    let active = events.iter().find(|e| {
        e.event == "MIGRATION"
            && e.data.as_ref().and_then(|d| d["status"].as_str()) == Some("active")
    });
    let pass = events.iter().find(|e| e.event == "MIGRATION_PASS");
    let first_pass_s = match (active, pass) {
        (Some(a), Some(p)) => event_seconds(&a.timestamp, &p.timestamp),
        _ => {
            // No events: fall back to the whole migration minus its setup.
            let total = info["total-time"].as_u64().unwrap_or(0);
            let setup = info["setup-time"].as_u64().unwrap_or(0);
            total.saturating_sub(setup) as f64 / 1e3
        }
    };
    let d_info = dst.wait_migration_end(Duration::from_secs(30), Duration::from_millis(50))?;
    let dst_cpu = dst.cpu_seconds().zip(dst_cpu0).map(|(b, a)| b - a);
    if d_info["status"] != "completed" {
        return Err(RowError::Bench(BenchError::Failed(format!(
            "the destination ended with {d_info}; its log:\n{}",
            dst.log()
        ))));
    }
    let sd = src.cmd("ferry-memory-digest", json!({}))?;
    let dd = dst.cmd("ferry-memory-digest", json!({}))?;
    let populate = dst
        .log()
        .lines()
        .find(|l| l.contains("populated") || l.contains("preallocated"))
        .map(|l| l.trim_start_matches("ferry: ").to_string());
    Ok(OneRun {
        src_cpu,
        dst_cpu,
        first_pass_s,
        info,
        populate,
        digests_match: sd["digest"] == dd["digest"] && sd["digest"].is_string(),
        timeline,
    })
}

/// What a row is measured against and with: the TCP reference, the TLS credentials.
struct RowEnv<'a> {
    tcp: Option<f64>,
    tls: Option<&'a TlsCreds>,
}

fn measure_row(
    env: &BenchEnv,
    data: &DataSet,
    memory: u64,
    config: &Config,
    dest: &Dest,
    runs: usize,
    row_env: RowEnv<'_>,
) -> Result<Measured, RowError> {
    let RowEnv { tcp, tls } = row_env;
    let mut best: Option<OneRun> = None;
    let mut all = Vec::new();
    for _ in 0..runs {
        let r = one_run(env, data, memory, config, dest, tls)?;
        all.push(super::gib_per_s(
            memory,
            Duration::from_secs_f64(r.first_pass_s),
        ));
        if best
            .as_ref()
            .is_none_or(|b| r.first_pass_s < b.first_pass_s)
        {
            best = Some(r);
        }
    }
    let r = best.ok_or_else(|| RowError::Bench(BenchError::Failed("no run".into())))?;
    let ram = &r.info["ram"];
    let wire = ram["transferred"].as_u64().unwrap_or(0);
    let secs = r.first_pass_s.max(1e-9);
    let gib = (1u64 << 30) as f64;
    let guest = memory as f64 / secs / gib;
    let wire_rate = wire as f64 / secs / gib;
    if !r.digests_match {
        return Err(RowError::Bench(BenchError::Failed(format!(
            "{} {} -> {}: source and destination memory differ after the migration",
            data.kind, config.name, dest.name
        ))));
    }
    Ok(Measured {
        first_pass_s: r.first_pass_s,
        guest_gib_per_s: guest,
        wire_bytes: wire,
        wire_gib_per_s: wire_rate,
        tcp_gib_per_s: tcp,
        wire_vs_tcp: tcp.map(|t| wire_rate / t),
        guest_vs_tcp: tcp.map(|t| guest / t),
        total_time_ms: r.info["total-time"].as_u64().unwrap_or(0),
        downtime_ms: r.info["downtime"].as_u64().unwrap_or(0),
        normal_pages: ram["normal"].as_u64().unwrap_or(0),
        zero_pages: ram["duplicate"].as_u64().unwrap_or(0),
        multifd_bytes: ram["multifd-bytes"].as_u64().unwrap_or(0),
        source_cpu_s_per_gib: r.src_cpu.map(|c| c * gib / memory as f64),
        dest_cpu_s_per_gib: r.dst_cpu.map(|c| c * gib / memory as f64),
        dest_populate: r.populate,
        digests_match: r.digests_match,
        runs_guest_gib_per_s: all,
        timeline: r.timeline.and_then(|v| serde_json::from_value(v).ok()),
    })
}

/// What the section measured.
pub struct Section {
    /// TCP references (hot buffers), one per stream count.
    pub tcp: Vec<TcpFigure>,
    /// The memory-bound TCP references on the random image, one per stream count of the
    /// uncompressed configurations (see [`tcp::measure_memory_once`]).
    pub tcp_memory: Vec<TcpFigure>,
    /// The same on one stream into preallocated memory, when a plain row goes there.
    pub tcp_memory_prealloc: Option<TcpFigure>,
    /// Every row.
    pub rows: Vec<ThroughputRow>,
    /// Errors of references and rows that could not run.
    pub errors: Vec<String>,
}

/// The stream counts of `configs`, each once, smallest first.
fn stream_counts<'a>(configs: impl Iterator<Item = &'a Config>) -> Vec<usize> {
    let mut counts: Vec<usize> = configs.map(Config::streams).collect();
    counts.sort_unstable();
    counts.dedup();
    counts
}

/// Runs the section: the TCP references, then every row.
pub fn run(
    env: &BenchEnv,
    data_sets: &[DataSet],
    memory: u64,
    configs: &[Config],
    dests: &[Dest],
    runs: usize,
) -> Section {
    let mut errors = Vec::new();
    let mut refs: Vec<TcpFigure> = Vec::new();
    let ref_runs = if env.quick { 2 } else { 3 };
    for n in stream_counts(configs.iter()) {
        env.say(format!(
            "TCP reference, {n} stream(s), {} MiB",
            memory >> 20
        ));
        match tcp::measure(&env.tcp_ends(), n, memory, ref_runs) {
            Ok(f) => refs.push(f),
            Err(e) => errors.push(format!("TCP reference with {n} stream(s): {e}")),
        }
    }
    let memory_streams = stream_counts(configs.iter().filter(|c| c.moves_pages_as_they_are()));
    let mut tcp_memory = Vec::new();
    if let Some(d) = data_sets.iter().find(|d| d.kind == "random") {
        for n in memory_streams {
            env.say(format!(
                "TCP reference from the {} image into fresh memory, {n} stream(s), {} MiB",
                d.kind,
                memory >> 20
            ));
            match tcp::measure_memory(&env.tcp_ends(), &d.path, memory, n, ref_runs, false) {
                Ok(f) => tcp_memory.push(f),
                Err(e) => errors.push(format!("memory-bound TCP reference, {n} stream(s): {e}")),
            }
        }
    }
    let mut tcp_memory_prealloc = None;
    let plain_prealloc =
        configs.iter().any(|c| c.name == "plain") && dests.iter().any(|d| d.name == "prealloc");
    if let Some(d) = data_sets
        .iter()
        .find(|d| d.kind == "random" && plain_prealloc)
    {
        env.say(format!(
            "TCP reference from the {} image into preallocated memory, 1 stream, {} MiB",
            d.kind,
            memory >> 20
        ));
        match tcp::measure_memory(&env.tcp_ends(), &d.path, memory, 1, ref_runs, true) {
            Ok(f) => tcp_memory_prealloc = Some(f),
            Err(e) => errors.push(format!(
                "memory-bound TCP reference into preallocated memory: {e}"
            )),
        }
    }
    let tcp_for = |n: usize| refs.iter().find(|f| f.streams == n).map(|f| f.gib_per_s);
    let tls = if configs.iter().any(|c| c.tls) {
        match TlsCreds::generate(&env.dir) {
            Ok(c) => Some(c),
            Err(e) => {
                errors.push(format!("TLS rows: {e}"));
                None
            }
        }
    } else {
        None
    };
    let mut rows = Vec::new();
    let mut unavailable: Vec<(&'static str, String)> = Vec::new();
    for data in data_sets {
        for config in configs {
            // Multifd, compress and TLS rows go into a fresh destination only.
            let row_dests: Vec<&Dest> = if config.special() {
                dests.iter().filter(|d| d.name == "fresh").take(1).collect()
            } else {
                dests.iter().collect()
            };
            for dest in row_dests {
                let mut row = ThroughputRow {
                    data_set: data.kind.clone(),
                    config: config.name.to_string(),
                    dest: dest.name.to_string(),
                    measured: None,
                    unavailable: None,
                };
                if let Some((_, why)) = unavailable.iter().find(|(n, _)| *n == config.name) {
                    row.unavailable = Some(why.clone());
                    rows.push(row);
                    continue;
                }
                env.say(format!(
                    "throughput: {} -> {} destination, {}",
                    data.kind, dest.name, config.name
                ));
                match measure_row(
                    env,
                    data,
                    memory,
                    config,
                    dest,
                    runs,
                    RowEnv {
                        tcp: tcp_for(config.streams()),
                        tls: tls.as_ref(),
                    },
                ) {
                    Ok(m) => {
                        env.say(format!(
                            "  first pass {:.2} s: {:.2} GiB/s of guest memory, {:.2} GiB/s on the wire",
                            m.first_pass_s, m.guest_gib_per_s, m.wire_gib_per_s
                        ));
                        row.measured = Some(m);
                    }
                    Err(RowError::Unavailable(why)) => {
                        env.say(format!("  unavailable: {why}"));
                        unavailable.push((config.name, why.clone()));
                        row.unavailable = Some(why);
                    }
                    Err(RowError::Bench(e)) => {
                        env.say(format!("  failed: {e}"));
                        errors.push(format!(
                            "throughput {} {} -> {}: {e}",
                            data.kind, config.name, dest.name
                        ));
                        row.unavailable = Some(format!("failed: {e}"));
                    }
                }
                rows.push(row);
            }
        }
    }
    Section {
        tcp: refs,
        tcp_memory,
        tcp_memory_prealloc,
        rows,
        errors,
    }
}

/// The fastest the link carried a migration in this run (plain, random, fresh), else the
/// single-stream TCP reference, in bytes per second.
pub fn link_rate(rows: &[ThroughputRow], tcp: &[TcpFigure]) -> Option<f64> {
    let gib = (1u64 << 30) as f64;
    rows.iter()
        .filter(|r| r.config == "plain" && r.data_set == "random")
        .filter_map(|r| r.ok().map(|m| m.wire_gib_per_s))
        .reduce(f64::max)
        .or_else(|| tcp.iter().find(|f| f.streams == 1).map(|f| f.gib_per_s))
        .map(|g| g * gib)
}

/// A TLS row against the same configuration without TLS, same data set and destination.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TlsRatio {
    /// Data set.
    pub data_set: String,
    /// The TLS configuration.
    pub config: String,
    /// The configuration without TLS.
    pub without_tls: String,
    /// Destination kind.
    pub dest: String,
    /// Guest GiB/s of the first pass over TLS.
    pub tls_gib_per_s: f64,
    /// Guest GiB/s of the first pass without TLS.
    pub plain_gib_per_s: f64,
    /// tls / plain.
    pub ratio: f64,
}

/// Every TLS row that ran beside its configuration without TLS.
pub fn tls_ratios(rows: &[ThroughputRow]) -> Vec<TlsRatio> {
    rows.iter()
        .filter_map(|r| {
            let base = CONFIGS
                .iter()
                .find(|c| c.name == r.config)
                .and_then(Config::without_tls)?;
            let m = r.ok()?;
            let b = rows
                .iter()
                .filter(|x| x.config == base && x.data_set == r.data_set && x.dest == r.dest)
                .find_map(ThroughputRow::ok)?;
            Some(TlsRatio {
                data_set: r.data_set.clone(),
                config: r.config.clone(),
                without_tls: base.to_string(),
                dest: r.dest.clone(),
                tls_gib_per_s: m.guest_gib_per_s,
                plain_gib_per_s: b.guest_gib_per_s,
                ratio: m.guest_gib_per_s / b.guest_gib_per_s.max(1e-9),
            })
        })
        .collect()
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".into(), |x| format!("{x:.digits$}"))
}

/// The section as a table.
pub fn table(rows: &[ThroughputRow], qemu: &QemuReference) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "\nthroughput of the first pass (idle guest, max-bandwidth unlimited):\n\
         \x20 {:<7} {:<13} {:<11} {:>7} {:>8} {:>7} {:>6} {:>8} {:>9} {:>8} {:>12}",
        "data",
        "config",
        "dest",
        "pass s",
        "guest/s",
        "wire/s",
        "TCP/s",
        "wire/TCP",
        "guest/TCP",
        "vs QEMU",
        "CPU s/GiB"
    );
    for r in rows {
        match r.ok() {
            Some(m) => {
                let q = match r.dest.as_str() {
                    "prealloc" => qemu.prealloc_gib_per_s.1,
                    _ => qemu.fresh_gib_per_s.1,
                };
                let _ = writeln!(
                    t,
                    "  {:<7} {:<13} {:<11} {:>7.2} {:>8.2} {:>7.2} {:>6} {:>8} {:>9} {:>7.2}x {:>5}/{:<6}",
                    r.data_set,
                    r.config,
                    r.dest,
                    m.first_pass_s,
                    m.guest_gib_per_s,
                    m.wire_gib_per_s,
                    opt(m.tcp_gib_per_s, 2),
                    opt(m.wire_vs_tcp, 2),
                    opt(m.guest_vs_tcp, 2),
                    m.guest_gib_per_s / q,
                    opt(m.source_cpu_s_per_gib, 2),
                    opt(m.dest_cpu_s_per_gib, 2)
                );
            }
            None => {
                let _ = writeln!(
                    t,
                    "  {:<7} {:<13} {:<11} {}",
                    r.data_set,
                    r.config,
                    r.dest,
                    r.unavailable.as_deref().unwrap_or("not run")
                );
            }
        }
    }
    let _ = writeln!(
        t,
        "  (GiB/s; guest = guest memory / first pass, wire = bytes sent / first pass; vs QEMU = guest / QEMU 7.2's best\n\
         \x20  figure for that destination: {:.1} fresh, {:.1} preallocated; CPU s/GiB = source/destination process CPU time during\n\
         \x20  the migration per GiB of guest memory; every row's destination memory digest = the source's)",
        qemu.fresh_gib_per_s.1, qemu.prealloc_gib_per_s.1
    );
    let tls = tls_ratios(rows);
    if !tls.is_empty() {
        let _ = writeln!(
            t,
            "  TLS (rustls; first pass over TLS / the same configuration without TLS, this run):"
        );
        for x in &tls {
            let _ = writeln!(
                t,
                "    {:<7} {:<14} vs {:<10} {:<6} {:.2}x ({:.2} / {:.2} GiB/s of guest memory)",
                x.data_set,
                x.config,
                x.without_tls,
                x.dest,
                x.ratio,
                x.tls_gib_per_s,
                x.plain_gib_per_s
            );
        }
    }
    for r in rows
        .iter()
        .filter(|r| CONFIGS.iter().any(|c| c.name == r.config && c.zero_copy))
    {
        let base = rows
            .iter()
            .find(|x| x.config == "multifd-2" && x.data_set == r.data_set && x.dest == r.dest);
        if let (Some(m), Some(b)) = (r.ok(), base.and_then(ThroughputRow::ok)) {
            let _ = writeln!(
                t,
                "  zero-copy send ({}, {}): source CPU {} s/GiB vs {} copying; {:.2} vs {:.2} GiB/s",
                r.config,
                r.data_set,
                opt(m.source_cpu_s_per_gib, 2),
                opt(b.source_cpu_s_per_gib, 2),
                m.guest_gib_per_s,
                b.guest_gib_per_s
            );
        }
    }
    for r in rows {
        if let Some(p) = r.ok().and_then(|m| m.dest_populate.as_ref()) {
            let _ = writeln!(
                t,
                "  {} {} -> {}: destination {p}",
                r.data_set, r.config, r.dest
            );
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configurations_and_destinations_are_looked_up_by_name() {
        assert_eq!(configs(&[]).unwrap().len(), 7);
        assert_eq!(CONFIGS.len(), 10);
        let c = configs(&["zstd-1".into(), "plain".into()]).unwrap();
        assert_eq!(c[0].params()["multifd-zstd-level"], 1);
        assert_eq!(c[0].params()["multifd-compression"], "zstd");
        assert_eq!(c[0].streams(), 2);
        assert_eq!(c[1].streams(), 1);
        assert!(c[1].caps().is_empty());
        assert!(configs(&["multifd-9".into()]).is_err());
        assert_eq!(dests(&[]).unwrap().len(), 2);
        assert_eq!(
            dests(&["thp".into()]).unwrap()[0].memory_suffix,
            ",backend=anon,hugepages=thp"
        );
        assert!(dests(&["warm".into()]).is_err());
    }

    #[test]
    fn a_tls_configuration_brings_its_reference_without_tls() {
        let names = |v: &[&str]| {
            configs(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap()
                .iter()
                .map(|c| c.name)
                .collect::<Vec<_>>()
        };
        assert_eq!(names(&["tls"]), ["plain", "tls"]);
        assert_eq!(
            names(&["multifd-2-tls", "tls", "plain"]),
            ["multifd-2", "multifd-2-tls", "plain", "tls"]
        );
        let c = configs(&["multifd-2-tls".into()]).unwrap();
        assert!(c[1].tls && !c[0].tls);
        assert_eq!(c[1].streams(), 2);
        assert_eq!(c[1].params(), c[0].params());
        assert!(configs(&[]).unwrap().iter().all(|c| !c.tls));
    }

    #[test]
    fn a_zero_copy_configuration_brings_multifd_2_and_sets_the_capability_on_the_source_only() {
        let c = configs(&["multifd-2-zc".into()]).unwrap();
        assert_eq!(
            c.iter().map(|c| c.name).collect::<Vec<_>>(),
            ["multifd-2", "multifd-2-zc"]
        );
        assert!(c[1].source_caps().contains(&("zero-copy-send", true)));
        assert!(!c[1].caps().contains(&("zero-copy-send", true)));
        assert!(!c[0].source_caps().contains(&("zero-copy-send", true)));
        assert_eq!(c[1].params(), c[0].params());
        assert!(configs(&[]).unwrap().iter().all(|c| !c.zero_copy));
    }

    #[test]
    fn the_link_rate_prefers_a_measured_migration() {
        let m = |wire: f64| Measured {
            first_pass_s: 1.0,
            guest_gib_per_s: wire,
            wire_bytes: 0,
            wire_gib_per_s: wire,
            tcp_gib_per_s: None,
            wire_vs_tcp: None,
            guest_vs_tcp: None,
            total_time_ms: 0,
            downtime_ms: 0,
            normal_pages: 0,
            zero_pages: 0,
            multifd_bytes: 0,
            source_cpu_s_per_gib: None,
            dest_cpu_s_per_gib: None,
            dest_populate: None,
            digests_match: true,
            runs_guest_gib_per_s: vec![],
            timeline: None,
        };
        let row = |data: &str, wire: f64| ThroughputRow {
            data_set: data.into(),
            config: "plain".into(),
            dest: "fresh".into(),
            measured: Some(m(wire)),
            unavailable: None,
        };
        let tcp = vec![TcpFigure {
            streams: 1,
            bytes: 1,
            gib_per_s: 2.0,
            runs_gib_per_s: vec![2.0],
        }];
        let gib = (1u64 << 30) as f64;
        assert_eq!(
            link_rate(
                &[row("mixed", 3.0), row("random", 1.0), row("random", 1.5)],
                &tcp
            ),
            Some(1.5 * gib)
        );
        assert_eq!(link_rate(&[], &tcp), Some(2.0 * gib));
        assert_eq!(link_rate(&[], &[]), None);
        let named = |config: &str, data: &str, wire: f64| ThroughputRow {
            config: config.into(),
            ..row(data, wire)
        };
        let ratios = tls_ratios(&[
            named("plain", "random", 2.0),
            named("tls", "random", 1.5),
            named("tls", "mixed", 1.0),
            named("multifd-2", "random", 3.0),
            named("multifd-2-tls", "random", 1.5),
        ]);
        assert_eq!(ratios.len(), 2, "{ratios:?}");
        assert_eq!((ratios[0].config.as_str(), ratios[0].ratio), ("tls", 0.75));
        assert_eq!(ratios[1].without_tls, "multifd-2");
        assert_eq!(ratios[1].ratio, 0.5);
        let text = table(
            &[row("random", 1.0)],
            &QemuReference {
                fresh_gib_per_s: (1.0, 1.4),
                prealloc_gib_per_s: (2.2, 4.0),
                source: "x",
            },
        );
        assert!(text.contains("random  plain         fresh"), "{text}");
    }
}
