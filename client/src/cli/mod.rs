//! The `rill` command-line tool: arguments, dispatch and output formatting. Built on the
//! library's [`crate::Admin`], [`crate::Producer`] and [`crate::Consumer`].
//!
//! - `admin_cmds`, `stream_cmds`, `security_cmds`: the verbs (`security_cmds`: principals,
//!   tokens, ACLs, whoami).
//! - `subscription_cmds`: `rill subscription ...` and `rill consume --subscription/--push`.
//! - [`units`]: human units for tables (`7d`, `256 MiB`, ages); JSON keeps raw numbers.
//! - `report`: [`error_line`], the one line a failed command prints.
//! - `empty_read`: why a `consume` that stopped at the end printed nothing.
//! - `help_examples` (tests only): every command's `--help` has an example that parses.

mod admin_cmds;
mod cluster_cmds;
mod empty_read;
#[cfg(test)]
mod help_examples;
mod report;
mod security_cmds;
mod stream_cmds;
mod subscription_cmds;
mod top;
pub mod units;

use std::io::Write;

use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};

use crate::connection::{ConnectOptions, Connection, DEFAULT_BROKER};

pub use report::error_line;

/// `rill`: topics, messages and consumer groups of a Rill broker.
#[derive(Debug, Parser)]
#[command(
    name = "rill",
    version,
    about,
    propagate_version = true,
    after_help = "Example:\n  rill --broker 10.0.0.5:7171 topic list"
)]
pub struct Cli {
    /// The broker's address.
    #[arg(long, env = "RILL_BROKER", default_value = DEFAULT_BROKER, global = true)]
    pub broker: String,
    /// Output format: human tables, or JSON (JSON lines for consume).
    #[arg(long, value_enum, default_value_t = Output::Table, global = true)]
    pub output: Output,
    /// Connection security: TLS and the bearer token.
    #[command(flatten)]
    pub security: SecurityFlags,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// How the CLI reaches a broker that serves TLS or wants a token.
#[derive(Debug, Clone, clap::Args)]
pub struct SecurityFlags {
    /// CA certificates (PEM) to trust for the broker's certificate; turns TLS on.
    #[arg(long, env = "RILL_TLS_CA", global = true)]
    pub tls_ca: Option<std::path::PathBuf>,
    /// A client certificate (PEM) for mutual TLS.
    #[arg(long, env = "RILL_CLIENT_TLS_CERT", global = true)]
    pub tls_cert: Option<std::path::PathBuf>,
    /// The client certificate's key (PEM).
    #[arg(long, env = "RILL_CLIENT_TLS_KEY", global = true)]
    pub tls_key: Option<std::path::PathBuf>,
    /// A file holding the bearer token (the RILL_TOKEN variable wins).
    #[arg(long, env = "RILL_TOKEN_FILE", global = true)]
    pub token_file: Option<std::path::PathBuf>,
    /// The bearer token, from the environment only so it never shows in a process list.
    #[arg(
        long = "token-from-env-only",
        env = "RILL_TOKEN",
        hide = true,
        hide_env_values = true,
        global = true
    )]
    pub token: Option<String>,
}

impl SecurityFlags {
    /// The connection options these flags ask for.
    pub fn options(&self) -> Result<ConnectOptions> {
        let token = match (&self.token, &self.token_file) {
            (Some(t), _) => Some(t.trim().to_string()),
            (None, Some(path)) => Some(
                std::fs::read_to_string(path)
                    .map_err(|e| anyhow::anyhow!("reading the token file {}: {e}", path.display()))?
                    .trim()
                    .to_string(),
            ),
            (None, None) => None,
        };
        Ok(ConnectOptions {
            tls_ca: self.tls_ca.clone(),
            tls_cert: self.tls_cert.clone(),
            tls_key: self.tls_key.clone(),
            token,
        })
    }
}

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned columns for people.
    Table,
    /// JSON for programs.
    Json,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create, list, describe and delete topics.
    #[command(after_help = "Example:\n  rill topic describe orders")]
    Topic {
        /// The topic command.
        #[command(subcommand)]
        command: TopicCommand,
    },
    /// Produce records: one per line of stdin (or of --file).
    #[command(
        after_help = "Example:\n  printf 'k1:hello\\nk2:world\\n' | rill produce orders --key-separator : --header source=cli --compression lz4"
    )]
    Produce(stream_cmds::ProduceArgs),
    /// Consume records: one value per line by default.
    #[command(after_help = stream_cmds::CONSUME_AFTER_HELP)]
    Consume(stream_cmds::ConsumeArgs),
    /// List, describe, reset and delete consumer groups.
    #[command(after_help = "Example:\n  rill group describe billing")]
    Group {
        /// The group command.
        #[command(subcommand)]
        command: GroupCommand,
    },
    /// Create, list, describe, delete and seek queue subscriptions.
    #[command(after_help = "Example:\n  rill subscription describe jobs --output json")]
    Subscription {
        /// The subscription command.
        #[command(subcommand)]
        command: subscription_cmds::SubscriptionCommand,
    },
    /// Create and list principals (needs the admin).
    #[command(after_help = "Example:\n  rill principal create billing")]
    Principal {
        /// The principal command.
        #[command(subcommand)]
        command: security_cmds::PrincipalCommand,
    },
    /// Create, list and revoke bearer tokens (needs the admin).
    #[command(after_help = "Example:\n  rill token create --principal billing --expires 30d")]
    Token {
        /// The token command.
        #[command(subcommand)]
        command: security_cmds::TokenCommand,
    },
    /// Add, list and remove access rules (needs the admin).
    #[command(
        after_help = "Example:\n  rill acl add --principal billing --operation produce --topic orders.*"
    )]
    Acl {
        /// The ACL command.
        #[command(subcommand)]
        command: security_cmds::AclCommand,
    },
    /// Show the principal the broker sees for these credentials.
    #[command(after_help = "Example:\n  RILL_TOKEN=rill_... rill whoami")]
    Whoami,
    /// A live view of topics' produce and fetch rates, groups' lag and waiting long-polls
    /// (q or Ctrl-C quits); `--once --output json` prints one sample for scripts.
    #[command(after_help = "Example:\n  rill top --once --output json")]
    Top(top::TopArgs),
    /// Show the cluster: brokers, liveness, the controller leader.
    #[command(after_help = "Example:\n  rill cluster status")]
    Cluster {
        /// The cluster command.
        #[command(subcommand)]
        command: cluster_cmds::ClusterCommand,
    },
    /// Print shell completions.
    #[command(
        after_help = "Example:\n  rill completions bash > ~/.local/share/bash-completion/completions/rill"
    )]
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

/// Topic commands.
#[derive(Debug, Subcommand)]
pub enum TopicCommand {
    /// Create a topic.
    #[command(
        after_help = "Example:\n  rill topic create orders --partitions 3 --retention 7d --flush interval:1000 --compression zstd"
    )]
    Create(admin_cmds::CreateArgs),
    /// List topics.
    #[command(after_help = "Example:\n  rill topic list --output json")]
    List,
    /// Describe a topic: config and partitions.
    #[command(after_help = "Example:\n  rill topic describe orders")]
    Describe {
        /// The topic.
        name: String,
    },
    /// Delete a topic and its data.
    #[command(after_help = "Example:\n  rill topic delete orders")]
    Delete {
        /// The topic.
        name: String,
    },
}

/// Group commands.
#[derive(Debug, Subcommand)]
pub enum GroupCommand {
    /// List groups with their state and member count.
    #[command(after_help = "Example:\n  rill group list")]
    List,
    /// Show a group's state, epoch and members (with their partitions), and its committed
    /// offsets, high watermarks and lag.
    #[command(after_help = "Example:\n  rill group describe billing")]
    Describe {
        /// The group.
        group: String,
    },
    /// Delete a group's offsets and state (refused while it has live members).
    #[command(after_help = "Example:\n  rill group delete billing")]
    Delete {
        /// The group.
        group: String,
    },
    /// Move a group's offsets (a dry run unless --execute).
    #[command(
        after_help = "Example:\n  rill group reset-offsets billing --topic orders --to-earliest --execute"
    )]
    ResetOffsets(admin_cmds::ResetArgs),
}

/// Parameters shared by commands that print.
#[derive(Debug, Clone, Copy)]
pub struct Ctx {
    /// The output format.
    pub output: Output,
}

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> Result<()> {
    let ctx = Ctx { output: cli.output };
    if let Command::Completions { shell } = cli.command {
        let mut cmd = <Cli as clap::CommandFactory>::command();
        clap_complete::generate(shell, &mut cmd, "rill", &mut std::io::stdout());
        return Ok(());
    }
    let conn = Connection::connect_with(&cli.broker, &cli.security.options()?).await?;
    match cli.command {
        Command::Topic { command } => admin_cmds::topic(conn, ctx, command).await,
        Command::Group { command } => admin_cmds::group(conn, ctx, command).await,
        Command::Produce(args) => stream_cmds::produce(conn, ctx, args).await,
        Command::Consume(args) => stream_cmds::consume(conn, ctx, args).await,
        Command::Subscription { command } => {
            subscription_cmds::subscription(conn, ctx, command).await
        }
        Command::Principal { command } => security_cmds::principal(conn, ctx, command).await,
        Command::Token { command } => security_cmds::token(conn, ctx, command).await,
        Command::Acl { command } => security_cmds::acl(conn, ctx, command).await,
        Command::Whoami => security_cmds::whoami(conn, ctx).await,
        Command::Top(args) => top::top(conn, ctx, args, &cli.broker).await,
        Command::Cluster { command } => cluster_cmds::cluster(conn, ctx, command).await,
        Command::Completions { .. } => Ok(()),
    }
}

/// Prints rows as aligned columns under a header.
pub fn print_table(header: &[&str], rows: &[Vec<String>]) -> Result<()> {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let mut out = std::io::stdout().lock();
    let line = |cells: Vec<&str>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    writeln!(out, "{}", line(header.to_vec()))?;
    for row in rows {
        writeln!(out, "{}", line(row.iter().map(String::as_str).collect()))?;
    }
    Ok(())
}

/// Prints one JSON value on its own line.
pub fn print_json(value: &serde_json::Value) -> Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, value)?;
    writeln!(out)?;
    Ok(())
}

/// Parses a duration such as `7d`, `12h`, `30m` or `500ms`.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("bad duration {s:?}: {e} (try 7d, 12h, 30m, 500ms)"))
}

/// Parses `--since`: an RFC 3339 time (`2026-11-22T10:00:00Z`) or a duration ago (`10m`).
pub fn parse_since(s: &str) -> Result<i64, String> {
    if let Ok(t) = humantime::parse_rfc3339_weak(s) {
        return t
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .map_err(|_| format!("time {s:?} is before 1970"));
    }
    let ago = parse_duration(s).map_err(|_| {
        format!("bad time {s:?}: use RFC 3339 (2026-11-22T10:00:00Z) or a duration ago (10m)")
    })?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|e| e.to_string())?;
    Ok(now.saturating_sub(ago).as_millis() as i64)
}

/// Parses a `k=v` header.
pub fn parse_header(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("bad header {s:?}: use key=value"))
}

/// Bytes as a JSON string when they are UTF-8, otherwise base64 (the caller records which).
pub fn bytes_json(b: &[u8]) -> (serde_json::Value, bool) {
    match std::str::from_utf8(b) {
        Ok(s) => (serde_json::Value::String(s.to_string()), false),
        Err(_) => {
            use base64::Engine;
            (
                serde_json::Value::String(base64::engine::general_purpose::STANDARD.encode(b)),
                true,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_times_and_headers_parse() {
        assert_eq!(parse_duration("7d").expect("7d").as_secs(), 7 * 86_400);
        assert_eq!(parse_duration("500ms").expect("ms").as_millis(), 500);
        assert!(parse_duration("soon").is_err());
        assert_eq!(parse_since("1970-01-01T00:00:01Z").expect("rfc3339"), 1000);
        let ten_min_ago = parse_since("10m").expect("duration ago");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_millis() as i64;
        assert!((now - 600_000 - ten_min_ago).abs() < 5_000);
        assert_eq!(
            parse_header("a=b=c").expect("header"),
            ("a".into(), "b=c".into())
        );
        assert!(parse_header("nokey").is_err());
    }

    #[test]
    fn bytes_become_json_strings_or_base64() {
        assert_eq!(bytes_json(b"hi"), (serde_json::json!("hi"), false));
        assert_eq!(bytes_json(&[0xff, 0x00]), (serde_json::json!("/wA="), true));
    }

    #[test]
    fn the_command_line_parses() {
        let cli = Cli::try_parse_from([
            "rill",
            "--output",
            "json",
            "topic",
            "create",
            "t",
            "--partitions",
            "3",
            "--retention",
            "7d",
            "--flush",
            "interval:250",
        ])
        .expect("parse");
        assert_eq!(cli.output, Output::Json);
        let cli = Cli::try_parse_from([
            "rill",
            "consume",
            "t",
            "-n",
            "5",
            "--group",
            "g",
            "--print-key",
        ])
        .expect("parse");
        assert!(matches!(cli.command, Command::Consume(_)));
        assert!(Cli::try_parse_from([
            "rill",
            "group",
            "reset-offsets",
            "g",
            "--topic",
            "t",
            "--to-earliest",
            "--to-latest"
        ])
        .is_err());
    }
}
