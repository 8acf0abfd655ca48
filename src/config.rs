//! `node.toml`: the file form of `specter node`'s flags. Flags given on the
//! command line override the file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Human,
    /// One JSON object per line.
    Json,
}

/// `specter node` settings; every field may come from a flag or the file.
#[derive(Clone, Debug, Default, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct NodeSettings {
    /// UDP address to bind the QUIC endpoint to.
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Address other nodes dial (default: --listen, unless it is unspecified).
    #[arg(long)]
    pub advertise: Option<SocketAddr>,
    /// Seeds to join through, `host:port`, comma-separated or repeated.
    #[arg(long, value_delimiter = ',')]
    #[serde(default)]
    pub join: Vec<String>,
    /// Cluster CA certificate (PEM).
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// This node's certificate (PEM), issued by the CA.
    #[arg(long)]
    pub cert: Option<PathBuf>,
    /// This node's private key (PEM).
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// Loopback TCP address of the admin API (/status, /metrics).
    #[arg(long)]
    pub admin: Option<SocketAddr>,
    /// Once serving, write {id, quic, admin} as JSON to this file.
    #[arg(long)]
    pub ready_file: Option<PathBuf>,
    /// Public domain: tunnels are `<name>.<domain>`.
    #[arg(long)]
    pub domain: Option<String>,
    /// TCP address of the public TLS ingress.
    #[arg(long)]
    pub https: Option<SocketAddr>,
    /// TCP address of the plain-HTTP ingress (Host names the tunnel).
    #[arg(long)]
    pub http: Option<SocketAddr>,
    /// What the plain-HTTP port does: `redirect` to HTTPS, or `proxy`.
    #[arg(long, value_enum)]
    pub http_mode: Option<crate::ingress::http::HttpMode>,
    /// Wildcard certificate for `*.<domain>` (PEM).
    #[arg(long)]
    pub edge_cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long)]
    pub edge_key: Option<PathBuf>,
    /// Who may register tunnels: `open`, or `token` (clients need a token
    /// from `specter ca issue-client-token`).
    #[arg(long, value_enum)]
    pub client_auth: Option<crate::node::tunnels::ClientAuth>,
    /// Log format.
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
    /// Visitor connections held at once (default 4096, lowered to fit the
    /// descriptor limit).
    #[arg(long)]
    #[serde(skip)]
    pub max_visitors: Option<usize>,
    /// Visitor connections one source address (IPv4, IPv6 /64) may hold.
    #[arg(long)]
    #[serde(skip)]
    pub visitors_per_source: Option<usize>,
    /// Seconds a raw-TCP visitor may stay idle (default 7200).
    #[arg(long)]
    #[serde(skip)]
    pub raw_tcp_idle: Option<u64>,
    /// Keep X-Forwarded-* and Forwarded arriving on the plain-HTTP port
    /// (behind the operator's own proxy) instead of replacing them.
    #[arg(long)]
    #[serde(skip)]
    pub trust_proxy_headers: bool,
    /// Every ingress bound (`[ingress]` in node.toml; see the README's
    /// "Limits and deadlines"); the flags above override it.
    #[arg(skip)]
    pub ingress: Option<crate::ingress::limits::IngressLimits>,
    /// What one client key may register (`[clients]` in node.toml).
    #[arg(skip)]
    pub clients: Option<crate::node::tunnels::quota::ClientLimits>,
}

/// A complete, checked node configuration.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// See [`NodeSettings::listen`].
    pub listen: SocketAddr,
    /// See [`NodeSettings::advertise`].
    pub advertise: SocketAddr,
    /// See [`NodeSettings::join`].
    pub join: Vec<String>,
    /// See [`NodeSettings::ca`].
    pub ca: PathBuf,
    /// See [`NodeSettings::cert`].
    pub cert: PathBuf,
    /// See [`NodeSettings::key`].
    pub key: PathBuf,
    /// See [`NodeSettings::admin`].
    pub admin: Option<SocketAddr>,
    /// See [`NodeSettings::ready_file`].
    pub ready_file: Option<PathBuf>,
    /// See [`NodeSettings::log_format`].
    pub log_format: LogFormat,
    /// Public ingress, when enabled.
    pub ingress: Option<IngressConfig>,
    /// See [`NodeSettings::client_auth`].
    pub client_auth: crate::node::tunnels::ClientAuth,
    /// Plain-HTTP ingress address, mode and domain.
    pub http: Option<(SocketAddr, crate::ingress::http::HttpMode, String)>,
    /// What a visitor may hold, and for how long.
    pub ingress_limits: crate::ingress::limits::IngressLimits,
    /// What one client key may register.
    pub client_limits: crate::node::tunnels::quota::ClientLimits,
}

/// Where and how the node serves visitors.
#[derive(Clone, Debug)]
pub struct IngressConfig {
    /// See [`NodeSettings::domain`].
    pub domain: String,
    /// See [`NodeSettings::https`].
    pub https: SocketAddr,
    /// See [`NodeSettings::edge_cert`].
    pub edge_cert: PathBuf,
    /// See [`NodeSettings::edge_key`].
    pub edge_key: PathBuf,
}

/// A configuration problem; reported before anything is bound.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The config file is not valid TOML for these settings.
    #[error("{path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: Box<toml::de::Error>,
    },
    /// A required setting is missing.
    #[error("missing --{0} (or `{0}` in the config file)")]
    Missing(&'static str),
    /// --advertise is needed because --listen is a wildcard address.
    #[error(
        "--listen {0} is a wildcard address; pass --advertise with an address other nodes can dial"
    )]
    NeedAdvertise(SocketAddr),
    /// The admin API must stay on loopback.
    #[error("--admin {0} is not a loopback address; the admin API is for local use only")]
    AdminNotLoopback(SocketAddr),
    /// An ingress bound of zero would refuse or cut every visitor.
    #[error("`{0}` (in [ingress], or its flag) must be above zero")]
    Zero(&'static str),
}

impl NodeSettings {
    /// Reads a `node.toml`.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source: Box::new(source),
        })
    }

    /// `self` (flags) over `file`.
    pub fn over(self, file: NodeSettings) -> NodeSettings {
        NodeSettings {
            listen: self.listen.or(file.listen),
            advertise: self.advertise.or(file.advertise),
            join: if self.join.is_empty() {
                file.join
            } else {
                self.join
            },
            ca: self.ca.or(file.ca),
            cert: self.cert.or(file.cert),
            key: self.key.or(file.key),
            admin: self.admin.or(file.admin),
            ready_file: self.ready_file.or(file.ready_file),
            log_format: self.log_format.or(file.log_format),
            domain: self.domain.or(file.domain),
            https: self.https.or(file.https),
            edge_cert: self.edge_cert.or(file.edge_cert),
            edge_key: self.edge_key.or(file.edge_key),
            client_auth: self.client_auth.or(file.client_auth),
            http: self.http.or(file.http),
            http_mode: self.http_mode.or(file.http_mode),
            max_visitors: self.max_visitors.or(file.max_visitors),
            visitors_per_source: self.visitors_per_source.or(file.visitors_per_source),
            raw_tcp_idle: self.raw_tcp_idle.or(file.raw_tcp_idle),
            trust_proxy_headers: self.trust_proxy_headers || file.trust_proxy_headers,
            ingress: self.ingress.or(file.ingress),
            clients: self.clients.or(file.clients),
        }
    }

    /// Checks the settings and fills defaults.
    pub fn resolve(self) -> Result<NodeConfig, ConfigError> {
        let listen = self.listen.ok_or(ConfigError::Missing("listen"))?;
        let advertise = match self.advertise {
            Some(a) => a,
            None if listen.ip().is_unspecified() => return Err(ConfigError::NeedAdvertise(listen)),
            None => listen,
        };
        if let Some(admin) = self.admin
            && !admin.ip().is_loopback()
        {
            return Err(ConfigError::AdminNotLoopback(admin));
        }
        let domain = self.domain;
        let ingress = match self.https {
            None => None,
            Some(https) => Some(IngressConfig {
                domain: domain.clone().ok_or(ConfigError::Missing("domain"))?,
                https,
                edge_cert: self.edge_cert.ok_or(ConfigError::Missing("edge-cert"))?,
                edge_key: self.edge_key.ok_or(ConfigError::Missing("edge-key"))?,
            }),
        };
        let http = match self.http {
            None => None,
            Some(addr) => Some((
                addr,
                self.http_mode.unwrap_or_default(),
                domain.ok_or(ConfigError::Missing("domain"))?,
            )),
        };
        let mut ingress_limits = self.ingress.unwrap_or_default();
        if let Some(n) = self.max_visitors {
            ingress_limits.max_visitors = n;
        }
        if let Some(n) = self.visitors_per_source {
            ingress_limits.visitors_per_source = n;
        }
        if let Some(secs) = self.raw_tcp_idle {
            ingress_limits.raw_tcp_idle = std::time::Duration::from_secs(secs);
        }
        ingress_limits.trust_proxy_headers |= self.trust_proxy_headers;
        if let Some(name) = ingress_limits.zero_bound() {
            return Err(ConfigError::Zero(name));
        }
        Ok(NodeConfig {
            ingress_limits,
            client_limits: self.clients.unwrap_or_default(),
            http,
            client_auth: self.client_auth.unwrap_or_default(),
            ingress,
            listen,
            advertise,
            join: self
                .join
                .into_iter()
                .filter(|s| !s.trim().is_empty())
                .collect(),
            ca: self.ca.ok_or(ConfigError::Missing("ca"))?,
            cert: self.cert.ok_or(ConfigError::Missing("cert"))?,
            key: self.key.ok_or(ConfigError::Missing("key"))?,
            admin: self.admin,
            ready_file: self.ready_file,
            log_format: self.log_format.unwrap_or_default(),
        })
    }
}

/// The settings that differ between `running` and `next` and that only a
/// restart applies: sockets, the cluster and the visitor bounds. Certificate
/// and key files are reloaded and so are not listed.
pub fn restart_needed(running: &NodeConfig, next: &NodeConfig) -> Vec<&'static str> {
    let mut changed = Vec::new();
    let mut check = |name, differs: bool| {
        if differs {
            changed.push(name);
        }
    };
    check("listen", running.listen != next.listen);
    check("advertise", running.advertise != next.advertise);
    check("join", running.join != next.join);
    check("admin", running.admin != next.admin);
    check("ready_file", running.ready_file != next.ready_file);
    check("log_format", running.log_format != next.log_format);
    check("client_auth", running.client_auth != next.client_auth);
    let https = |c: &NodeConfig| c.ingress.as_ref().map(|i| (i.https, i.domain.clone()));
    check("https or domain", https(running) != https(next));
    check("http or http_mode", running.http != next.http);
    check("ingress", running.ingress_limits != next.ingress_limits);
    check("clients", running.client_limits != next.client_limits);
    changed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_file_and_unknown_keys_are_refused() {
        let file: NodeSettings = toml::from_str(
            "listen = \"127.0.0.2:7000\"\njoin = [\"127.0.0.3:7000\"]\nca = \"ca.crt\"\ncert = \"n.crt\"\nkey = \"n.key\"\n",
        )
        .unwrap();
        let flags = NodeSettings {
            listen: Some("127.0.0.9:1".parse().unwrap()),
            ..Default::default()
        };
        let c = flags.over(file).resolve().unwrap();
        assert_eq!(c.listen, "127.0.0.9:1".parse().unwrap());
        assert_eq!(c.advertise, c.listen);
        assert_eq!(c.join, vec!["127.0.0.3:7000".to_string()]);
        assert!(toml::from_str::<NodeSettings>("lisen = \"x\"").is_err());
    }

    #[test]
    fn an_ingress_bound_of_zero_is_refused_by_name() {
        let base =
            "listen = \"127.0.0.2:7000\"\nca = \"ca.crt\"\ncert = \"n.crt\"\nkey = \"n.key\"\n";
        let read = |ingress: &str| {
            toml::from_str::<NodeSettings>(&format!("{base}[ingress]\n{ingress}\n"))
                .unwrap()
                .resolve()
        };
        assert!(read("answer_timeout = 2.5").is_ok());
        assert!(read("body_min_rate = 0").is_ok(), "no minimum rate");
        for (setting, name) in [
            ("answer_timeout = 0", "answer_timeout"),
            ("write_stall_timeout = 0", "write_stall_timeout"),
            ("max_visitors = 0", "max_visitors"),
        ] {
            let Err(err) = read(setting) else {
                panic!("{setting} was accepted")
            };
            let err = err.to_string();
            assert!(err.contains(name) && err.contains("above zero"), "{err}");
        }
        let flag = NodeSettings {
            raw_tcp_idle: Some(0),
            ..toml::from_str(base).unwrap()
        };
        assert!(
            flag.resolve()
                .unwrap_err()
                .to_string()
                .contains("raw_tcp_idle")
        );
    }

    #[test]
    fn the_example_configs_in_contrib_parse() {
        let node: NodeSettings = toml::from_str(include_str!("../contrib/node.toml")).unwrap();
        let node = node.resolve().unwrap();
        assert_eq!(node.client_limits.claims_per_minute, 32);
        assert_eq!(node.ingress_limits.visitors_per_source, 64);
        let client: TunnelSettings =
            toml::from_str(include_str!("../contrib/client.toml")).unwrap();
        assert!(!client.tunnels.is_empty());
    }

    #[test]
    fn a_client_grace_period_comes_from_the_flag_the_file_or_the_default() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.crt");
        std::fs::write(&ca, "not read as PEM here").unwrap();
        let file: TunnelSettings = toml::from_str(&format!(
            "via = [\"127.0.0.1:7000\"]\nca = {ca:?}\ngrace_period = 5\n[[tunnels]]\nto = \"http://127.0.0.1:3000\"\n"
        ))
        .unwrap();
        let grace = |flags: TunnelSettings, file: TunnelSettings| {
            flags.over(file).resolve().unwrap().grace_period
        };
        assert_eq!(
            grace(TunnelSettings::default(), file.clone()),
            std::time::Duration::from_secs(5)
        );
        let flags = TunnelSettings {
            grace_period: Some(0),
            ..Default::default()
        };
        assert_eq!(grace(flags, file.clone()), std::time::Duration::ZERO);
        let without = TunnelSettings {
            grace_period: None,
            ..file
        };
        assert_eq!(
            grace(TunnelSettings::default(), without),
            crate::client::GRACE_PERIOD
        );
    }

    #[test]
    fn a_clients_workers_come_from_the_flag_the_file_the_environment_or_one() {
        let file: TunnelSettings = toml::from_str("workers = 4\n").unwrap();
        let flags = TunnelSettings {
            workers: Some(2),
            ..Default::default()
        };
        assert_eq!(flags.over(file.clone()).workers(true), Some(2));
        assert_eq!(TunnelSettings::default().over(file).workers(true), Some(4));
        assert_eq!(TunnelSettings::default().workers(true), None);
        assert_eq!(
            TunnelSettings::default().workers(false),
            Some(crate::client::WORKERS)
        );
        let zero = TunnelSettings {
            workers: Some(0),
            ..Default::default()
        };
        assert_eq!(zero.workers(false), Some(1));
    }

    #[test]
    fn a_reload_lists_what_only_a_restart_changes() {
        let base = NodeSettings {
            listen: Some("127.0.0.2:7000".parse().unwrap()),
            ca: Some("ca.crt".into()),
            cert: Some("n.crt".into()),
            key: Some("n.key".into()),
            ..Default::default()
        };
        let running = base.clone().resolve().unwrap();
        // New certificate paths are reloaded, not a restart.
        let renewed = NodeSettings {
            cert: Some("renewed.crt".into()),
            key: Some("renewed.key".into()),
            ..base.clone()
        };
        assert!(restart_needed(&running, &renewed.resolve().unwrap()).is_empty());
        let moved = NodeSettings {
            listen: Some("127.0.0.2:7001".parse().unwrap()),
            join: vec!["127.0.0.3:7000".into()],
            max_visitors: Some(10),
            ..base
        };
        assert_eq!(
            restart_needed(&running, &moved.resolve().unwrap()),
            vec!["listen", "advertise", "join", "ingress"]
        );
    }

    #[test]
    fn a_wildcard_listen_needs_advertise_and_admin_must_be_loopback() {
        let base = NodeSettings {
            listen: Some("0.0.0.0:7000".parse().unwrap()),
            ca: Some("a".into()),
            cert: Some("b".into()),
            key: Some("c".into()),
            ..Default::default()
        };
        assert!(matches!(
            base.clone().resolve(),
            Err(ConfigError::NeedAdvertise(_))
        ));
        let public_admin = NodeSettings {
            advertise: Some("127.0.0.2:7000".parse().unwrap()),
            admin: Some("0.0.0.0:9000".parse().unwrap()),
            ..base
        };
        assert!(matches!(
            public_admin.resolve(),
            Err(ConfigError::AdminNotLoopback(_))
        ));
    }
}

/// One tunnel in `client.toml`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TunnelEntry {
    /// The name (optional for the first tunnel: saved or random).
    pub name: Option<String>,
    /// Local target: `tcp://HOST:PORT` or `http://HOST:PORT`.
    pub to: String,
}

/// `specter tunnel` settings from flags and `client.toml`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TunnelSettings {
    /// Seeds.
    #[serde(default)]
    pub via: Vec<String>,
    /// Cluster CA certificate.
    pub ca: Option<PathBuf>,
    /// State directory.
    pub state_dir: Option<PathBuf>,
    /// Attachments to keep.
    pub attachments: Option<usize>,
    /// Token file.
    pub token: Option<PathBuf>,
    /// Ready file (JSON: names, public URLs, attachments), rewritten on
    /// every change.
    pub ready_file: Option<PathBuf>,
    /// Seconds a stopping client lets visitors under way finish.
    pub grace_period: Option<u64>,
    /// Worker threads of the client's runtime.
    pub workers: Option<usize>,
    /// The tunnels (`[[tunnels]]` in the file).
    #[serde(default)]
    pub tunnels: Vec<TunnelEntry>,
}

impl TunnelSettings {
    /// Reads `client.toml` (or nothing).
    pub fn load(path: Option<&Path>) -> anyhow::Result<Self> {
        let Some(path) = path else {
            return Ok(Self::default());
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    /// `self` (flags) over `file`.
    pub fn over(self, file: TunnelSettings) -> TunnelSettings {
        TunnelSettings {
            via: if self.via.is_empty() {
                file.via
            } else {
                self.via
            },
            ca: self.ca.or(file.ca),
            state_dir: self.state_dir.or(file.state_dir),
            attachments: self.attachments.or(file.attachments),
            token: self.token.or(file.token),
            ready_file: self.ready_file.or(file.ready_file),
            grace_period: self.grace_period.or(file.grace_period),
            workers: self.workers.or(file.workers),
            tunnels: if self.tunnels.is_empty() {
                file.tunnels
            } else {
                self.tunnels
            },
        }
    }

    /// Worker threads for the client's runtime: the setting, else none named
    /// here when `TOKIO_WORKER_THREADS` is set (tokio reads it), else
    /// [`crate::client::WORKERS`].
    pub fn workers(&self, env_set: bool) -> Option<usize> {
        match self.workers {
            Some(n) => Some(n.max(1)),
            None if env_set => None,
            None => Some(crate::client::WORKERS),
        }
    }

    /// Checks the settings and reads the CA and token files.
    pub fn resolve(self) -> anyhow::Result<crate::client::ClientOptions> {
        let ca = self
            .ca
            .ok_or_else(|| anyhow::anyhow!("missing --ca (or `ca` in the config file)"))?;
        let ca_pem =
            std::fs::read_to_string(&ca).map_err(|e| anyhow::anyhow!("{}: {e}", ca.display()))?;
        if self.via.is_empty() {
            anyhow::bail!("missing --via (or `via` in the config file)");
        }
        let mut tunnels = self.tunnels.into_iter();
        let first = tunnels.next().ok_or_else(|| {
            anyhow::anyhow!("missing --to (or a [[tunnels]] entry in the config file)")
        })?;
        let mut extra = Vec::new();
        for t in tunnels {
            let name = t.name.ok_or_else(|| {
                anyhow::anyhow!("every tunnel after the first needs a name ({})", t.to)
            })?;
            extra.push((name, crate::client::Target::parse(&t.to)?));
        }
        let token = match self.token {
            None => None,
            Some(p) => Some(
                std::fs::read_to_string(&p)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?
                    .trim()
                    .to_string(),
            ),
        };
        Ok(crate::client::ClientOptions {
            via: self.via,
            ca_pem,
            state_dir: self
                .state_dir
                .unwrap_or_else(|| PathBuf::from(".specter-client")),
            target: crate::client::Target::parse(&first.to)?,
            name: first.name,
            attachments: self
                .attachments
                .unwrap_or(crate::client::ATTACHMENTS)
                .max(1),
            token,
            extra,
            ready_file: self.ready_file,
            grace_period: self
                .grace_period
                .map_or(crate::client::GRACE_PERIOD, std::time::Duration::from_secs),
        })
    }
}
