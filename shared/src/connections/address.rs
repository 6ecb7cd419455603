//! Which network addresses a tenant's connection may reach. Everything that is not the public
//! internet is refused (the platform's own network, the machine itself, cloud metadata), unless
//! the operator allows it with `CONVEYOR_CONNECTION_ALLOW`.

use ipnet::IpNet;
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    str::FromStr,
    sync::LazyLock,
};

/// Ranges a connection may not reach, with the reason given to the client. The first match
/// wins, so the specific entries (metadata, broadcast) come before the ranges that hold them.
static INTERNAL: LazyLock<Vec<(IpNet, &'static str)>> = LazyLock::new(|| {
    [
        ("169.254.169.254/32", "cloud metadata"),
        ("fd00:ec2::254/128", "cloud metadata"),
        ("255.255.255.255/32", "broadcast"),
        ("0.0.0.0/8", "unspecified"),
        ("127.0.0.0/8", "loopback"),
        ("10.0.0.0/8", "private"),
        ("172.16.0.0/12", "private"),
        ("192.168.0.0/16", "private"),
        ("100.64.0.0/10", "shared (carrier-grade NAT)"),
        ("169.254.0.0/16", "link-local"),
        ("192.0.0.0/24", "reserved"),
        ("198.18.0.0/15", "reserved"),
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved"),
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("64:ff9b:1::/48", "private"),
        ("fc00::/7", "private"),
        ("fec0::/10", "private"),
        ("fe80::/10", "link-local"),
        ("ff00::/8", "multicast"),
        ("100::/64", "reserved"),
    ]
    .into_iter()
    .map(|(net, why)| (net.parse().expect("literal network"), why))
    .collect()
});

/// Why `ip` is not on the public internet, or `None` when it is. IPv6 addresses that carry an
/// IPv4 address (mapped, compatible, NAT64) are judged by that address.
pub fn internal_reason(ip: IpAddr) -> Option<&'static str> {
    let ip = embedded_ipv4(ip).map_or(ip, IpAddr::V4);
    INTERNAL
        .iter()
        .find(|(net, _)| net.contains(&ip))
        .map(|(_, why)| *why)
}

/// The IPv4 address inside an IPv6 one that stands for it.
fn embedded_ipv4(ip: IpAddr) -> Option<Ipv4Addr> {
    let IpAddr::V6(v6) = ip else { return None };
    if let Some(v4) = v6.to_ipv4_mapped() {
        return Some(v4);
    }
    let [a, b, c, d, e, f, g, h] = v6.segments();
    let low = Ipv4Addr::from((u32::from(g) << 16) | u32::from(h));
    match [a, b, c, d, e, f] {
        // IPv4-compatible (deprecated, still routed by some stacks); :: and ::1 are themselves.
        [0, 0, 0, 0, 0, 0] if v6 > Ipv6Addr::LOCALHOST => Some(low),
        // NAT64's well-known prefix: the gateway connects to the embedded address.
        [0x64, 0xff9b, 0, 0, 0, 0] => Some(low),
        _ => None,
    }
}

/// `CONVEYOR_CONNECTION_ALLOW`: hosts and networks the operator lets connections reach
/// although they are internal (a database on the private network, the test's loopback).
#[derive(Clone, Debug, Default)]
pub struct AllowList {
    hosts: Vec<String>,
    nets: Vec<IpNet>,
}

impl FromStr for AllowList {
    type Err = String;

    /// Comma-separated: `db.internal, 10.1.0.0/16, 192.168.1.7, ::1`.
    fn from_str(list: &str) -> Result<Self, String> {
        let mut allow = Self::default();
        for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            if let Ok(net) = entry.parse::<IpNet>() {
                allow.nets.push(net);
            } else if let Ok(ip) = entry.parse::<IpAddr>() {
                allow.nets.push(IpNet::from(ip));
            } else if entry.contains('/') {
                return Err(format!("{entry:?} is neither a host nor a network"));
            } else {
                allow.hosts.push(entry.to_ascii_lowercase());
            }
        }
        Ok(allow)
    }
}

impl AllowList {
    /// Whether the connection to `host` (as written in its URL) at `ip` is allowed.
    pub fn allows(&self, host: &str, ip: IpAddr) -> bool {
        let ip = embedded_ipv4(ip).map_or(ip, IpAddr::V4);
        self.hosts.iter().any(|h| h.eq_ignore_ascii_case(host))
            || self.nets.iter().any(|net| net.contains(&ip))
    }
}

/// Why `ip` (reached for `host`) may not be sent to by `what` (`webhooks`, `buckets`), or
/// `None` when it may.
pub fn refusal(allow: &AllowList, host: &str, ip: IpAddr, what: &str) -> Option<String> {
    if allow.allows(host, ip) {
        return None;
    }
    internal_reason(ip).map(|why| refused_address(host, why, what))
}

/// The refusal of an address a name or URL led to. A name is refused without the address it
/// resolved to nor what kind of address that is, and as a name that does not resolve is: the
/// answers would otherwise map the platform's internal names to their addresses.
pub fn refused_address(host: &str, why: &str, what: &str) -> String {
    if host.trim_matches(['[', ']']).parse::<IpAddr>().is_ok() {
        let allow = allow_setting(what);
        format!(
            "{host} is a {why} address, which {what} may not reach \
             (an operator can allow it with {allow})"
        )
    } else {
        unresolved(host, what)
    }
}

/// The refusal of a name that does not resolve, or resolves only to refused addresses.
pub(crate) fn unresolved(host: &str, what: &str) -> String {
    let allow = allow_setting(what);
    format!(
        "{host} does not resolve to a public address: {what} may not reach others \
         (an operator can allow them with {allow})"
    )
}

/// The setting whose list lets `what` reach internal addresses.
fn allow_setting(what: &str) -> &'static str {
    if what == "webhooks" {
        "CONVEYOR_WEBHOOK_ALLOW"
    } else {
        "CONVEYOR_CONNECTION_ALLOW"
    }
}

/// How long resolving an outbound HTTP host may take.
pub const RESOLVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Resolves an `http(s)` URL's host and checks every address it has against the rules; the
/// addresses, all allowed. The error is for the client. (An address written in the URL is
/// never resolved by the HTTP client, so this check is the one that applies to it.)
pub async fn check_http_url(
    url: &url::Url,
    allow: &AllowList,
    what: &str,
) -> Result<Vec<SocketAddr>, String> {
    let port = url.port_or_known_default().unwrap_or(443);
    let (host, addrs) = match url.host() {
        Some(url::Host::Ipv4(ip)) => (ip.to_string(), vec![SocketAddr::new(ip.into(), port)]),
        Some(url::Host::Ipv6(ip)) => (ip.to_string(), vec![SocketAddr::new(ip.into(), port)]),
        Some(url::Host::Domain(name)) => {
            let lookup = tokio::net::lookup_host((name, port));
            let addrs: Vec<SocketAddr> = tokio::time::timeout(RESOLVE_TIMEOUT, lookup)
                .await
                .map_err(|_| format!("resolving {name} timed out"))?
                .map_err(|_| unresolved(name, what))?
                .collect();
            if addrs.is_empty() {
                return Err(unresolved(name, what));
            }
            (name.to_owned(), addrs)
        }
        None => return Err("must name a host".into()),
    };
    for addr in &addrs {
        if let Some(why) = refusal(allow, &host, addr.ip(), what) {
            return Err(why);
        }
    }
    Ok(addrs)
}

/// The address rules' refusal of where a request was to go, as [`CheckedResolver`] answers
/// it: ours to tell a tenant, unlike what the service behind an address says.
#[derive(Debug)]
pub struct AddressRefused(pub String);

impl std::fmt::Display for AddressRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for AddressRefused {}

/// Resolves hosts for an outbound HTTP client and refuses the connection when any address is
/// one the rules forbid: the check applies to the very addresses connected to, so a DNS answer
/// that changes after [`check_http_url`] cannot move a request onto a refused address.
pub struct CheckedResolver {
    allow: AllowList,
    what: &'static str,
}

impl CheckedResolver {
    pub fn new(allow: AllowList, what: &'static str) -> Self {
        Self { allow, what }
    }
}

impl reqwest::dns::Resolve for CheckedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let (allow, what) = (self.allow.clone(), self.what);
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let lookup = tokio::net::lookup_host((host.as_str(), 0));
            // A lookup's own error (`Name or service not known`) is not passed on: it would tell
            // a name that does not exist from one the rules refuse.
            let addrs: Vec<SocketAddr> = tokio::time::timeout(RESOLVE_TIMEOUT, lookup)
                .await
                .map_err(|_| format!("resolving {host} timed out"))?
                .map_err(|_| AddressRefused(unresolved(&host, what)))?
                .collect();
            for addr in &addrs {
                if let Some(why) = refusal(&allow, &host, addr.ip(), what) {
                    return Err(AddressRefused(why).into());
                }
            }
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// Two addresses reach the same machine's server: equal, or both this machine (every
/// loopback address and the unspecified one connect here).
pub fn same_host(a: IpAddr, b: IpAddr) -> bool {
    let local = |ip: IpAddr| {
        let ip = embedded_ipv4(ip).map_or(ip, IpAddr::V4);
        ip.is_loopback() || ip.is_unspecified()
    };
    let a4 = embedded_ipv4(a).map_or(a, IpAddr::V4);
    let b4 = embedded_ipv4(b).map_or(b, IpAddr::V4);
    a4 == b4 || (local(a) && local(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(ip: &str) -> Option<&'static str> {
        internal_reason(ip.parse().unwrap())
    }

    #[test]
    fn internal_addresses_are_named() {
        for (ip, why) in [
            ("127.0.0.1", "loopback"),
            ("127.8.9.10", "loopback"),
            ("::1", "loopback"),
            ("0.0.0.0", "unspecified"),
            ("::", "unspecified"),
            ("10.1.2.3", "private"),
            ("172.16.0.1", "private"),
            ("172.31.255.255", "private"),
            ("192.168.1.1", "private"),
            ("100.64.0.1", "shared (carrier-grade NAT)"),
            ("100.100.100.200", "shared (carrier-grade NAT)"),
            ("fd12:3456::1", "private"),
            ("fc00::1", "private"),
            ("169.254.1.1", "link-local"),
            ("fe80::1", "link-local"),
            ("169.254.169.254", "cloud metadata"),
            ("fd00:ec2::254", "cloud metadata"),
            ("224.0.0.1", "multicast"),
            ("ff02::1", "multicast"),
            ("255.255.255.255", "broadcast"),
            ("240.0.0.1", "reserved"),
            // IPv6 spellings of IPv4 addresses are judged by the IPv4 address.
            ("::ffff:127.0.0.1", "loopback"),
            ("::ffff:169.254.169.254", "cloud metadata"),
            ("::ffff:10.0.0.1", "private"),
            ("::10.0.0.1", "private"),
            ("64:ff9b::a9fe:a9fe", "cloud metadata"),
            ("64:ff9b::7f00:1", "loopback"),
        ] {
            assert_eq!(reason(ip), Some(why), "{ip}");
        }
    }

    #[test]
    fn public_addresses_pass() {
        for ip in [
            "8.8.8.8",
            "1.1.1.1",
            "172.32.0.1",
            "100.128.0.1",
            "2001:4860:4860::8888",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
        ] {
            assert_eq!(reason(ip), None, "{ip}");
        }
    }

    #[test]
    fn the_allow_list_takes_hosts_networks_and_addresses() {
        let allow: AllowList = "db.internal, 10.1.0.0/16, 192.168.1.7, ::1"
            .parse()
            .unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(allow.allows("DB.internal", ip("10.9.9.9")));
        assert!(allow.allows("x", ip("10.1.200.3")));
        assert!(allow.allows("x", ip("::ffff:10.1.200.3")));
        assert!(allow.allows("x", ip("192.168.1.7")));
        assert!(allow.allows("x", ip("::1")));
        assert!(!allow.allows("x", ip("192.168.1.8")));
        assert!(!allow.allows("x", ip("127.0.0.1")));
        assert!(!allow.allows("other.internal", ip("10.9.9.9")));
        assert!("10.0.0.0/99".parse::<AllowList>().is_err());
    }

    #[test]
    fn every_loopback_address_is_the_same_host() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(same_host(ip("127.0.0.1"), ip("127.0.0.2")));
        assert!(same_host(ip("127.0.0.1"), ip("::1")));
        assert!(same_host(ip("::ffff:127.0.0.1"), ip("0.0.0.0")));
        assert!(same_host(ip("10.0.0.1"), ip("::ffff:10.0.0.1")));
        assert!(!same_host(ip("127.0.0.1"), ip("10.0.0.1")));
    }

    /// The resolver an outbound client connects through refuses a name that does not resolve
    /// in the words it refuses an internal one with, not with the lookup's own error. (A label
    /// of 64 letters fails in the resolver library before any query is sent.)
    #[tokio::test]
    async fn the_resolver_refuses_a_missing_name_as_an_internal_one() {
        use reqwest::dns::Resolve;
        let resolver = CheckedResolver::new(AllowList::default(), "webhooks");
        let refusal = |name: String| {
            let resolving = resolver.resolve(name.parse().unwrap());
            async move {
                let Err(error) = resolving.await else {
                    panic!("{name} resolved")
                };
                error.to_string().replace(&name, "NAME")
            }
        };
        let missing = refusal(format!("{}.example", "a".repeat(64))).await;
        let internal = refusal("localhost".to_owned()).await;
        assert_eq!(missing, internal);
    }
}
