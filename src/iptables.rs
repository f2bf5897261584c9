//! `pylon init-iptables`: the init container's job (DESIGN § Kubernetes,
//! Interception). It redirects the pod's TCP traffic to the sidecar with
//! nat-table rules in chains of its own: inbound to the inbound listener,
//! outbound (from every UID but the proxy's) to the outbound listener.
//!
//! The rules are decided first, as text ([`restore_input`], a pure function
//! of the [`Interception`] and of which jumps already exist), then applied
//! with one `iptables-restore --noflush` per address family, so a run either
//! applies everything or nothing, and a second run changes nothing.
//!
//! It does not remove rules (the pod's network namespace goes away with the
//! pod), touch UDP, or configure the sidecar's listeners.

use std::fmt;
use std::io::{self, Write};
use std::net::IpAddr;
use std::process::{Command, ExitCode, Output, Stdio};
use std::str::FromStr;

/// Our chain for inbound traffic, jumped to from `PREROUTING`.
pub const INBOUND_CHAIN: &str = "PYLON_INBOUND";
/// Our chain for outbound traffic, jumped to from `OUTPUT`.
pub const OUTPUT_CHAIN: &str = "PYLON_OUTPUT";

/// How long `iptables-restore` may wait for the xtables lock, in seconds.
const LOCK_WAIT_SECS: &str = "5";

/// `pylon init-iptables` flags.
#[derive(clap::Args, Debug)]
pub struct InitArgs {
    /// Print the `iptables-restore` input (per address family) instead of
    /// applying it. Needs neither root nor iptables.
    #[arg(long)]
    pub dry_run: bool,
    /// The sidecar's UID: its own connections are never redirected.
    #[arg(long, default_value_t = 1337)]
    pub proxy_uid: u32,
    /// Where inbound TCP is redirected (the sidecar's inbound listener).
    #[arg(long, default_value_t = 15006, value_parser = clap::value_parser!(u16).range(1..))]
    pub inbound_port: u16,
    /// Where outbound TCP is redirected (the sidecar's outbound listener).
    #[arg(long, default_value_t = 15001, value_parser = clap::value_parser!(u16).range(1..))]
    pub outbound_port: u16,
    /// The sidecar's probe port: inbound TCP to it is never redirected.
    #[arg(long, default_value_t = 15020, value_parser = clap::value_parser!(u16).range(1..))]
    pub probe_port: u16,
    /// Inbound ports that bypass the sidecar (comma list, e.g. `22,9090`).
    #[arg(long, value_name = "LIST")]
    pub skip_inbound_ports: Option<String>,
    /// Outbound destination ports that bypass the sidecar (comma list).
    #[arg(long, value_name = "LIST")]
    pub skip_outbound_ports: Option<String>,
    /// Outbound destination networks that bypass the sidecar (comma list of
    /// CIDRs or addresses, IPv4 and IPv6).
    #[arg(long, value_name = "LIST")]
    pub skip_outbound_cidrs: Option<String>,
}

/// What to intercept: the validated flags.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interception {
    pub proxy_uid: u32,
    pub inbound_port: u16,
    pub outbound_port: u16,
    pub probe_port: u16,
    pub skip_inbound_ports: Vec<u16>,
    pub skip_outbound_ports: Vec<u16>,
    pub skip_outbound_cidrs: Vec<Cidr>,
}

impl Default for Interception {
    fn default() -> Self {
        Interception {
            proxy_uid: 1337,
            inbound_port: 15006,
            outbound_port: 15001,
            probe_port: 15020,
            skip_inbound_ports: Vec::new(),
            skip_outbound_ports: Vec::new(),
            skip_outbound_cidrs: Vec::new(),
        }
    }
}

impl Interception {
    /// Validates the flags; an error names the flag and the bad entry.
    pub fn from_args(args: &InitArgs) -> Result<Interception, InitError> {
        Ok(Interception {
            proxy_uid: args.proxy_uid,
            inbound_port: args.inbound_port,
            outbound_port: args.outbound_port,
            probe_port: args.probe_port,
            skip_inbound_ports: parse_list(
                "--skip-inbound-ports",
                args.skip_inbound_ports.as_deref().unwrap_or_default(),
                parse_port,
            )?,
            skip_outbound_ports: parse_list(
                "--skip-outbound-ports",
                args.skip_outbound_ports.as_deref().unwrap_or_default(),
                parse_port,
            )?,
            skip_outbound_cidrs: parse_list(
                "--skip-outbound-cidrs",
                args.skip_outbound_cidrs.as_deref().unwrap_or_default(),
                str::parse,
            )?,
        })
    }

    /// Inbound ports left alone: the probe port, then the skipped ones.
    fn inbound_bypass_ports(&self) -> Vec<u16> {
        let mut ports = vec![self.probe_port];
        ports.extend(
            self.skip_inbound_ports
                .iter()
                .filter(|p| **p != self.probe_port),
        );
        ports
    }
}

/// A comma list; blanks around entries and empty entries are ignored, and
/// so are repeats.
fn parse_list<T: PartialEq>(
    flag: &'static str,
    list: &str,
    parse: impl Fn(&str) -> Result<T, String>,
) -> Result<Vec<T>, InitError> {
    let mut items = Vec::new();
    for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let item = parse(entry).map_err(|reason| InitError::InvalidValue {
            flag,
            value: entry.to_string(),
            reason,
        })?;
        if !items.contains(&item) {
            items.push(item);
        }
    }
    Ok(items)
}

fn parse_port(s: &str) -> Result<u16, String> {
    s.parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| "not a port number (1-65535)".to_string())
}

/// An address block, `198.18.0.0/15` or `fd00::/8`; host bits are cleared
/// (as iptables does), a bare address is a block of one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    fn family(&self) -> Family {
        match self.addr {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Cidr, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{addr:?} is not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("the prefix length must be 0-{max}"))?,
        };
        let addr = match addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
                IpAddr::V4((u32::from(a) & mask).into())
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
                IpAddr::V6((u128::from(a) & mask).into())
            }
        };
        Ok(Cidr { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// An address family: which tools, which loopback block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    pub fn name(self) -> &'static str {
        match self {
            Family::V4 => "ipv4",
            Family::V6 => "ipv6",
        }
    }

    fn save_tool(self) -> &'static str {
        match self {
            Family::V4 => "iptables-save",
            Family::V6 => "ip6tables-save",
        }
    }

    fn restore_tool(self) -> &'static str {
        match self {
            Family::V4 => "iptables-restore",
            Family::V6 => "ip6tables-restore",
        }
    }

    fn loopback(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.0/8",
            Family::V6 => "::1/128",
        }
    }
}

/// Which of our jumps from the built-in chains the nat table already has:
/// those must not be added again (our own chains are simply flushed and
/// refilled).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExistingJumps {
    pub inbound: bool,
    pub outbound: bool,
}

impl ExistingJumps {
    /// Reads `iptables-save -t nat` output.
    pub fn parse(save: &str) -> ExistingJumps {
        let jumps = |chain: &str, target: &str| {
            save.lines().any(|line| {
                line.strip_prefix("-A ")
                    .and_then(|rule| rule.strip_prefix(chain))
                    .is_some_and(|rule| {
                        rule.starts_with(' ') && rule.ends_with(&format!(" -j {target}"))
                    })
            })
        };
        ExistingJumps {
            inbound: jumps("PREROUTING", INBOUND_CHAIN),
            outbound: jumps("OUTPUT", OUTPUT_CHAIN),
        }
    }
}

/// The `iptables-restore --noflush` input for one family: our chains
/// declared (which creates or flushes them), their rules, and the jumps to
/// them that are not there yet. Rules are spelled the way `iptables-save`
/// prints them, so the two can be compared line by line.
pub fn restore_input(i: &Interception, family: Family, existing: ExistingJumps) -> String {
    let mut rules = vec![
        "*nat".to_string(),
        format!(":{INBOUND_CHAIN} - [0:0]"),
        format!(":{OUTPUT_CHAIN} - [0:0]"),
    ];
    if !existing.inbound {
        rules.push(format!("-A PREROUTING -p tcp -j {INBOUND_CHAIN}"));
    }
    if !existing.outbound {
        rules.push(format!("-A OUTPUT -p tcp -j {OUTPUT_CHAIN}"));
    }

    for port in i.inbound_bypass_ports() {
        rules.push(format!(
            "-A {INBOUND_CHAIN} -p tcp -m tcp --dport {port} -j RETURN"
        ));
    }
    rules.push(format!(
        "-A {INBOUND_CHAIN} -p tcp -j REDIRECT --to-ports {}",
        i.inbound_port
    ));

    rules.push(format!(
        "-A {OUTPUT_CHAIN} -m owner --uid-owner {} -j RETURN",
        i.proxy_uid
    ));
    rules.push(format!("-A {OUTPUT_CHAIN} -o lo -j RETURN"));
    rules.push(format!(
        "-A {OUTPUT_CHAIN} -d {} -j RETURN",
        family.loopback()
    ));
    for port in &i.skip_outbound_ports {
        rules.push(format!(
            "-A {OUTPUT_CHAIN} -p tcp -m tcp --dport {port} -j RETURN"
        ));
    }
    for cidr in i
        .skip_outbound_cidrs
        .iter()
        .filter(|c| c.family() == family)
    {
        rules.push(format!("-A {OUTPUT_CHAIN} -d {cidr} -j RETURN"));
    }
    rules.push(format!(
        "-A {OUTPUT_CHAIN} -p tcp -j REDIRECT --to-ports {}",
        i.outbound_port
    ));
    rules.push("COMMIT".to_string());

    let mut text = rules.join("\n");
    text.push('\n');
    text
}

/// What went wrong; every variant says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("invalid {flag} entry {value:?}: {reason}")]
    InvalidValue {
        flag: &'static str,
        value: String,
        reason: String,
    },
    #[error(
        "{tool} is not on PATH: the init container's image must ship iptables \
         (iptables-save and iptables-restore, and their ip6tables twins for IPv6)"
    )]
    ToolMissing { tool: &'static str },
    #[error(
        "{tool} was refused: the init container needs the NET_ADMIN and NET_RAW \
         capabilities (and to run as root); {tool} said: {message}"
    )]
    PermissionDenied { tool: &'static str, message: String },
    #[error(
        "{tool} could not take the xtables lock: point XTABLES_LOCKFILE at a writable \
         file (the injected init container uses /tmp/xtables.lock); {tool} said: {message}"
    )]
    Lock { tool: &'static str, message: String },
    #[error("the kernel has no {family} nat table; {tool} said: {message}")]
    NoNatTable {
        family: &'static str,
        tool: &'static str,
        message: String,
    },
    #[error("{tool} failed ({status}): {message}")]
    Failed {
        tool: &'static str,
        status: String,
        message: String,
    },
    #[error("could not run {tool}: {source}")]
    Spawn {
        tool: &'static str,
        source: io::Error,
    },
}

/// Turns a failed iptables run into the error that explains it, from what
/// the tool printed. "Cannot initialize the table" without a permission
/// word means no permission for IPv4 (the table always exists where pods
/// run), but no IPv6 nat in the kernel for IPv6 (the IPv4 run, with the
/// same privileges, went through first).
fn classify(family: Family, tool: &'static str, output: &Output) -> InitError {
    let message = String::from_utf8_lossy(&output.stderr).trim().to_string();
    let says = |words: &[&str]| words.iter().any(|w| message.contains(w));
    if says(&["lock file", "xtables lock"]) {
        InitError::Lock { tool, message }
    } else if says(&[
        "Permission denied",
        "must be root",
        "Operation not permitted",
    ]) {
        InitError::PermissionDenied { tool, message }
    } else if says(&[
        "Table does not exist",
        "do you need to insmod",
        "Address family not supported",
        "Protocol not supported",
    ]) || (family == Family::V6 && says(&["initialize"]))
    {
        InitError::NoNatTable {
            family: family.name(),
            tool,
            message,
        }
    } else if says(&["can't initialize", "unable to initialize"]) {
        InitError::PermissionDenied { tool, message }
    } else {
        InitError::Failed {
            tool,
            status: output.status.to_string(),
            message,
        }
    }
}

/// Runs an iptables tool to completion, feeding it `input`.
fn run_tool(
    family: Family,
    tool: &'static str,
    args: &[&str],
    input: Option<&str>,
) -> Result<Output, InitError> {
    let mut child = Command::new(tool)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => InitError::ToolMissing { tool },
            _ => InitError::Spawn { tool, source },
        })?;
    if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin
            .write_all(input.as_bytes())
            .map_err(|source| InitError::Spawn { tool, source })?;
    }
    let output = child
        .wait_with_output()
        .map_err(|source| InitError::Spawn { tool, source })?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(classify(family, tool, &output))
    }
}

/// Our jumps already in the family's nat table.
fn read_existing(family: Family) -> Result<ExistingJumps, InitError> {
    let output = run_tool(family, family.save_tool(), &["-t", "nat"], None)?;
    Ok(ExistingJumps::parse(&String::from_utf8_lossy(
        &output.stdout,
    )))
}

/// `-w SECS` for a restore tool that documents it (iptables-legacy, which
/// takes the xtables lock; the nf_tables one needs no lock).
fn wait_args(family: Family) -> Vec<&'static str> {
    let help = Command::new(family.restore_tool())
        .arg("--help")
        .stdin(Stdio::null())
        .output();
    match help {
        Ok(out) => {
            let text = [out.stdout, out.stderr].concat();
            let text = String::from_utf8_lossy(&text);
            if text.contains("--wait") || text.contains("[-w") {
                vec!["-w", LOCK_WAIT_SECS]
            } else {
                Vec::new()
            }
        }
        Err(_) => Vec::new(),
    }
}

/// Applies one family's rules in one transaction.
fn apply_family(i: &Interception, family: Family) -> Result<(), InitError> {
    let input = restore_input(i, family, read_existing(family)?);
    let mut args = wait_args(family);
    args.push("--noflush");
    run_tool(family, family.restore_tool(), &args, Some(&input)).map(drop)
}

/// One line saying what is now intercepted.
fn summary(i: &Interception, families: &str) -> String {
    fn list<T: ToString>(items: &[T]) -> String {
        if items.is_empty() {
            "none".to_string()
        } else {
            items.iter().map(T::to_string).collect::<Vec<_>>().join(",")
        }
    }
    format!(
        "pylon init-iptables: applied {families} nat rules: inbound tcp -> :{} except ports {}; \
         outbound tcp -> :{} except uid {}, loopback, ports {}, cidrs {}",
        i.inbound_port,
        list(&i.inbound_bypass_ports()),
        i.outbound_port,
        i.proxy_uid,
        list(&i.skip_outbound_ports),
        list(&i.skip_outbound_cidrs),
    )
}

pub fn run(args: InitArgs) -> ExitCode {
    let interception = match Interception::from_args(&args) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("pylon init-iptables: {e}");
            return ExitCode::FAILURE;
        }
    };
    if args.dry_run {
        print_dry_run(&interception);
        return ExitCode::SUCCESS;
    }
    match apply(&interception) {
        Ok(families) => {
            println!("{}", summary(&interception, families));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("pylon init-iptables: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The input each family would get. Without iptables or root the current
/// tables cannot be read: the input is then the one for a table without
/// our jumps.
fn print_dry_run(i: &Interception) {
    for family in Family::ALL {
        let existing = read_existing(family).unwrap_or_else(|e| {
            eprintln!(
                "pylon init-iptables: cannot read the {} nat table, assuming none of our jumps: {e}",
                family.name()
            );
            ExistingJumps::default()
        });
        print!(
            "# {}\n{}",
            family.name(),
            restore_input(i, family, existing)
        );
    }
}

/// IPv4 first: without it nothing is intercepted, so its errors are fatal.
/// IPv6 may be missing (no ip6tables, no IPv6 nat in the kernel): a warning.
fn apply(i: &Interception) -> Result<&'static str, InitError> {
    apply_family(i, Family::V4)?;
    match apply_family(i, Family::V6) {
        Ok(()) => Ok("ipv4 and ipv6"),
        Err(e @ (InitError::ToolMissing { .. } | InitError::NoNatTable { .. })) => {
            eprintln!("pylon init-iptables: warning: IPv6 traffic is not intercepted: {e}");
            Ok("ipv4")
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(flags: &[&str]) -> InitArgs {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: InitArgs,
        }
        let argv = std::iter::once("init-iptables").chain(flags.iter().copied());
        <Cli as clap::Parser>::try_parse_from(argv).unwrap().args
    }

    fn interception(flags: &[&str]) -> Interception {
        Interception::from_args(&args(flags)).unwrap()
    }

    fn invalid(flags: &[&str]) -> String {
        Interception::from_args(&args(flags))
            .unwrap_err()
            .to_string()
    }

    const NONE: ExistingJumps = ExistingJumps {
        inbound: false,
        outbound: false,
    };

    #[test]
    fn no_annotations_give_the_default_rules_for_both_families() {
        let i = interception(&[]);
        assert_eq!(i, Interception::default());
        assert_eq!(
            restore_input(&i, Family::V4, NONE),
            "*nat
:PYLON_INBOUND - [0:0]
:PYLON_OUTPUT - [0:0]
-A PREROUTING -p tcp -j PYLON_INBOUND
-A OUTPUT -p tcp -j PYLON_OUTPUT
-A PYLON_INBOUND -p tcp -m tcp --dport 15020 -j RETURN
-A PYLON_INBOUND -p tcp -j REDIRECT --to-ports 15006
-A PYLON_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A PYLON_OUTPUT -o lo -j RETURN
-A PYLON_OUTPUT -d 127.0.0.0/8 -j RETURN
-A PYLON_OUTPUT -p tcp -j REDIRECT --to-ports 15001
COMMIT
"
        );
        assert_eq!(
            restore_input(&i, Family::V6, NONE),
            restore_input(&i, Family::V4, NONE).replace("127.0.0.0/8", "::1/128")
        );
    }

    #[test]
    fn skipped_inbound_ports_return_before_the_redirect() {
        let i = interception(&["--skip-inbound-ports", "22, 9090,,15020"]);
        assert_eq!(i.skip_inbound_ports, [22, 9090, 15020]);
        let text = restore_input(&i, Family::V4, NONE);
        assert!(text.contains(
            "-A PYLON_INBOUND -p tcp -m tcp --dport 15020 -j RETURN
-A PYLON_INBOUND -p tcp -m tcp --dport 22 -j RETURN
-A PYLON_INBOUND -p tcp -m tcp --dport 9090 -j RETURN
-A PYLON_INBOUND -p tcp -j REDIRECT --to-ports 15006
"
        ));
        assert_eq!(text.matches("--dport 15020").count(), 1, "{text}");
        assert!(
            !text.contains("PYLON_OUTPUT -p tcp -m tcp --dport"),
            "{text}"
        );
    }

    #[test]
    fn skipped_outbound_ports_return_in_both_families() {
        let i = interception(&["--skip-outbound-ports", "5432,6379"]);
        for family in Family::ALL {
            let text = restore_input(&i, family, NONE);
            assert!(text.contains(
                "-A PYLON_OUTPUT -p tcp -m tcp --dport 5432 -j RETURN
-A PYLON_OUTPUT -p tcp -m tcp --dport 6379 -j RETURN
-A PYLON_OUTPUT -p tcp -j REDIRECT --to-ports 15001
"
            ));
            assert!(!text.contains("PYLON_INBOUND -p tcp -m tcp --dport 5432"));
        }
    }

    #[test]
    fn skipped_cidrs_go_to_their_own_family_only() {
        let i = interception(&[
            "--skip-outbound-cidrs",
            " 198.18.5.7/24 ,fd00:1::5/64, 198.19.0.1, 2001:db8::1",
        ]);
        let v4 = restore_input(&i, Family::V4, NONE);
        assert!(v4.contains(
            "-A PYLON_OUTPUT -d 198.18.5.0/24 -j RETURN
-A PYLON_OUTPUT -d 198.19.0.1/32 -j RETURN
-A PYLON_OUTPUT -p tcp -j REDIRECT"
        ));
        assert!(!v4.contains("fd00") && !v4.contains("2001"), "{v4}");
        let v6 = restore_input(&i, Family::V6, NONE);
        assert!(v6.contains(
            "-A PYLON_OUTPUT -d fd00:1::/64 -j RETURN
-A PYLON_OUTPUT -d 2001:db8::1/128 -j RETURN
-A PYLON_OUTPUT -p tcp -j REDIRECT"
        ));
        assert!(!v6.contains("198.1"), "{v6}");
    }

    #[test]
    fn everything_together_with_custom_uid_and_ports() {
        let i = interception(&[
            "--proxy-uid",
            "2000",
            "--inbound-port",
            "16006",
            "--outbound-port",
            "16001",
            "--probe-port",
            "16020",
            "--skip-inbound-ports",
            "22",
            "--skip-outbound-ports",
            "3306",
            "--skip-outbound-cidrs",
            "198.18.0.0/15,fd00::/8",
        ]);
        assert_eq!(
            restore_input(&i, Family::V4, NONE),
            "*nat
:PYLON_INBOUND - [0:0]
:PYLON_OUTPUT - [0:0]
-A PREROUTING -p tcp -j PYLON_INBOUND
-A OUTPUT -p tcp -j PYLON_OUTPUT
-A PYLON_INBOUND -p tcp -m tcp --dport 16020 -j RETURN
-A PYLON_INBOUND -p tcp -m tcp --dport 22 -j RETURN
-A PYLON_INBOUND -p tcp -j REDIRECT --to-ports 16006
-A PYLON_OUTPUT -m owner --uid-owner 2000 -j RETURN
-A PYLON_OUTPUT -o lo -j RETURN
-A PYLON_OUTPUT -d 127.0.0.0/8 -j RETURN
-A PYLON_OUTPUT -p tcp -m tcp --dport 3306 -j RETURN
-A PYLON_OUTPUT -d 198.18.0.0/15 -j RETURN
-A PYLON_OUTPUT -p tcp -j REDIRECT --to-ports 16001
COMMIT
"
        );
        assert_eq!(
            restore_input(&i, Family::V6, NONE),
            "*nat
:PYLON_INBOUND - [0:0]
:PYLON_OUTPUT - [0:0]
-A PREROUTING -p tcp -j PYLON_INBOUND
-A OUTPUT -p tcp -j PYLON_OUTPUT
-A PYLON_INBOUND -p tcp -m tcp --dport 16020 -j RETURN
-A PYLON_INBOUND -p tcp -m tcp --dport 22 -j RETURN
-A PYLON_INBOUND -p tcp -j REDIRECT --to-ports 16006
-A PYLON_OUTPUT -m owner --uid-owner 2000 -j RETURN
-A PYLON_OUTPUT -o lo -j RETURN
-A PYLON_OUTPUT -d ::1/128 -j RETURN
-A PYLON_OUTPUT -p tcp -m tcp --dport 3306 -j RETURN
-A PYLON_OUTPUT -d fd00::/8 -j RETURN
-A PYLON_OUTPUT -p tcp -j REDIRECT --to-ports 16001
COMMIT
"
        );
    }

    #[test]
    fn empty_lists_are_no_lists() {
        let i = interception(&[
            "--skip-inbound-ports",
            "",
            "--skip-outbound-ports",
            " , ",
            "--skip-outbound-cidrs",
            "",
        ]);
        assert_eq!(i, Interception::default());
    }

    #[test]
    fn bad_entries_are_named_with_their_flag() {
        assert_eq!(
            invalid(&["--skip-inbound-ports", "22,ssh"]),
            r#"invalid --skip-inbound-ports entry "ssh": not a port number (1-65535)"#
        );
        assert_eq!(
            invalid(&["--skip-outbound-ports", "0"]),
            r#"invalid --skip-outbound-ports entry "0": not a port number (1-65535)"#
        );
        assert_eq!(
            invalid(&["--skip-outbound-ports", "70000"]),
            r#"invalid --skip-outbound-ports entry "70000": not a port number (1-65535)"#
        );
        assert_eq!(
            invalid(&["--skip-outbound-cidrs", "10.0.0.0/33"]),
            r#"invalid --skip-outbound-cidrs entry "10.0.0.0/33": the prefix length must be 0-32"#
        );
        assert_eq!(
            invalid(&["--skip-outbound-cidrs", "fd00::/129"]),
            r#"invalid --skip-outbound-cidrs entry "fd00::/129": the prefix length must be 0-128"#
        );
        assert_eq!(
            invalid(&["--skip-outbound-cidrs", "10.0.0/8"]),
            r#"invalid --skip-outbound-cidrs entry "10.0.0/8": "10.0.0" is not an IP address"#
        );
    }

    #[test]
    fn zero_length_prefixes_cover_everything() {
        let i = interception(&["--skip-outbound-cidrs", "1.2.3.4/0,::5/0"]);
        assert!(restore_input(&i, Family::V4, NONE).contains("-d 0.0.0.0/0 -j RETURN"));
        assert!(restore_input(&i, Family::V6, NONE).contains("-d ::/0 -j RETURN"));
    }

    #[test]
    fn existing_jumps_are_not_added_again() {
        let save = "# Generated by iptables-save v1.8.9 (nf_tables)
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [3:180]
:PYLON_INBOUND - [0:0]
:PYLON_OUTPUT - [0:0]
-A PREROUTING -p tcp -j PYLON_INBOUND
-A OUTPUT -p tcp -j PYLON_OUTPUT
-A PYLON_OUTPUT -p tcp -j REDIRECT --to-ports 15001
COMMIT
";
        let existing = ExistingJumps::parse(save);
        assert_eq!(
            existing,
            ExistingJumps {
                inbound: true,
                outbound: true
            }
        );
        let text = restore_input(&Interception::default(), Family::V4, existing);
        assert!(!text.contains("-A PREROUTING") && !text.contains("-A OUTPUT"));
        assert!(text.starts_with("*nat\n:PYLON_INBOUND - [0:0]\n:PYLON_OUTPUT - [0:0]\n"));

        let only_inbound = ExistingJumps::parse("-A PREROUTING -p tcp -j PYLON_INBOUND\n");
        assert_eq!(
            restore_input(&Interception::default(), Family::V4, only_inbound)
                .matches("-A OUTPUT -p tcp -j PYLON_OUTPUT")
                .count(),
            1
        );
        // Someone else's chains with similar names are not ours.
        assert_eq!(
            ExistingJumps::parse("-A OUTPUTX -j PYLON_OUTPUT\n-A OUTPUT -j PYLON_OUTPUT_2\n"),
            NONE
        );
    }

    fn failed(stderr: &str) -> Output {
        use std::os::unix::process::ExitStatusExt;
        Output {
            status: std::process::ExitStatus::from_raw(4 << 8),
            stdout: Vec::new(),
            stderr: stderr.as_bytes().to_vec(),
        }
    }

    #[test]
    fn permission_problems_name_the_capabilities() {
        for stderr in [
            "iptables-restore v1.8.9 (nf_tables): Could not fetch rule set generation id: Permission denied (you must be root)",
            "iptables-save v1.8.9 (legacy): Cannot initialize: Permission denied (you must be root)",
            "iptables-restore v1.6.1: can't initialize iptables table `nat': Permission denied (you must be root)",
            "iptables-restore: can't initialize iptables table `nat'",
            "iptables-restore v1.8.9 (legacy): iptables-restore: unable to initialize table 'nat'",
        ] {
            let e = classify(Family::V4, "iptables-restore", &failed(stderr));
            assert!(matches!(e, InitError::PermissionDenied { .. }), "{stderr}");
            let text = e.to_string();
            assert!(text.contains("NET_ADMIN and NET_RAW"), "{text}");
            assert!(text.ends_with(stderr), "{text}");
        }
    }

    #[test]
    fn missing_ipv6_nat_is_told_apart() {
        for stderr in [
            "ip6tables-restore v1.8.9 (legacy): ip6tables-restore: unable to initialize table 'nat'",
            "can't initialize ip6tables table `nat': Table does not exist (do you need to insmod?)",
            "ip6tables-save v1.8.9 (nf_tables): Failed to initialize nft: Address family not supported by protocol",
        ] {
            let e = classify(Family::V6, "ip6tables-restore", &failed(stderr));
            assert!(matches!(e, InitError::NoNatTable { .. }), "{stderr}: {e}");
        }
        let e = classify(
            Family::V6,
            "ip6tables-restore",
            &failed("can't initialize ip6tables table `nat': Permission denied"),
        );
        assert!(matches!(e, InitError::PermissionDenied { .. }), "{e}");
    }

    #[test]
    fn other_failures_keep_the_tools_words() {
        let e = classify(
            Family::V4,
            "iptables-restore",
            &failed("Fatal: can't open lock file /run/xtables.lock: Permission denied"),
        );
        assert!(e.to_string().contains("XTABLES_LOCKFILE"), "{e}");
        let e = classify(
            Family::V4,
            "iptables-restore",
            &failed(
                "iptables-restore v1.8.9 (nf_tables): invalid port/service `99999' specified\nError occurred at line: 3",
            ),
        );
        assert!(matches!(e, InitError::Failed { .. }), "{e}");
        assert!(e.to_string().contains("Error occurred at line: 3"), "{e}");
        assert_eq!(
            InitError::ToolMissing {
                tool: "iptables-restore"
            }
            .to_string(),
            "iptables-restore is not on PATH: the init container's image must ship iptables \
             (iptables-save and iptables-restore, and their ip6tables twins for IPv6)"
        );
    }

    #[test]
    fn the_summary_is_one_line() {
        let i = interception(&[
            "--skip-inbound-ports",
            "22",
            "--skip-outbound-cidrs",
            "198.18.5.0/24,fd00::/8",
        ]);
        assert_eq!(
            summary(&i, "ipv4 and ipv6"),
            "pylon init-iptables: applied ipv4 and ipv6 nat rules: inbound tcp -> :15006 except \
             ports 15020,22; outbound tcp -> :15001 except uid 1337, loopback, ports none, \
             cidrs 198.18.5.0/24,fd00::/8"
        );
    }
}
