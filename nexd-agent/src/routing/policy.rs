//! Exit-node client policy routing, for IPv4 and IPv6 alike:
//!
//! ```text
//! <priority-1>   from all lookup <table+1>            (excluded routes)
//! <priority>     from all lookup main suppress_prefixlength 7 (IPv6: 31)
//! <priority+1>   from all not fwmark <mark> lookup <table>
//! table <table>: default dev <wg>
//!                unreachable default metric 4294967295
//! ```
//!
//! The first rule keeps every route of the main table except its default
//! routes and any other that covers a large part of the internet (LAN,
//! mesh prefix, anything more specific stays reachable). A network that
//! pushes 0.0.0.0/1 and 128.0.0.0/1 (DHCP option 121: TunnelVision), or
//! ::/1 and 8000::/1 in router advertisements, would otherwise take the
//! device's traffic past the tunnel: routes of /7 and shorter (IPv6: /31)
//! are suppressed too. The shortest a LAN's own IPv4 route is in practice
//! is a private range (10.0.0.0/8). For IPv6 a few route options cover
//! the whole internet at any short length (sixteen /7s cover 2000::/3), so
//! everything shorter than an allocation (/32) is suppressed: a LAN's
//! site prefixes (/48 to /64) and an organisation's /32 stay, a pushed
//! fc00::/7 does not (exclude it with `--exclude` if it is wanted). The
//! second sends everything else that is not WireGuard's own marked UDP into
//! the tunnel, where only the exit peer accepts 0.0.0.0/0 and ::/0.
//! WireGuard's own packets carry the mark and fall through to the main
//! table's default route. The same scheme as wg-quick, with nexd's own,
//! fixed numbers (see `PolicyNumbers`), and one addition: unreachable
//! default routes at the end of nexd's table. The kernel deletes `default
//! dev <wg>` with the interface's last IPv4 address; without them a
//! lookup would then fall through to the main table's default route and
//! leave directly. They need no device, so nothing but nexd removes them.

use std::net::{Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt as _;
use netlink_packet_route::{
    AddressFamily,
    route::{RouteMessage, RouteScope, RouteType},
    rule::{RuleAction, RuleAttribute, RuleFlags, RuleMessage},
};
use rtnetlink::{IpVersion, RouteMessageBuilder};
use tracing::{debug, info};

use super::{
    PolicyNumbers,
    routes::{self, MAIN_TABLE},
    sysctl::{SRC_VALID_MARK, Sysctls},
};
use crate::netlink::{Netlink, NetlinkError};

/// Owner of the client's rules, table routes and `src_valid_mark`.
pub struct ClientRouting {
    numbers: PolicyNumbers,
}

/// Main-table routes this long or shorter are not used outside the tunnel
/// (IPv4): the default routes, and halves or quarters of the internet a
/// network may push. Every private range is longer.
pub const SUPPRESS_V4: u32 = 7;
/// The same for IPv6, up to an allocation's length: a router
/// advertisement's sixteen /7 route options cover 2000::/3, and each /32
/// covers a whole provider or organisation (of 2^29 in global space).
pub const SUPPRESS_V6: u32 = 31;

/// The metric of the unreachable fallback: after every other route.
pub const FALLBACK_METRIC: u32 = u32::MAX;

/// Which of the client's objects the kernel holds now (`present`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Present {
    /// `default dev <wg>`, v4 and v6.
    pub routes: bool,
    /// The unreachable defaults, v4 and v6.
    pub fallback: bool,
    /// All six rules (three priorities, v4 and v6).
    pub rules: bool,
}

fn rule_table(r: &RuleMessage) -> u32 {
    r.attributes
        .iter()
        .find_map(|a| match a {
            RuleAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(r.header.table))
}

fn rule_priority(r: &RuleMessage) -> Option<u32> {
    r.attributes.iter().find_map(|a| match a {
        RuleAttribute::Priority(p) => Some(*p),
        _ => None,
    })
}

/// What tells nexd's rules apart, from each other and from anything else
/// at its priorities: what `add_rules` writes and the kernel dumps back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RuleKey {
    v6: bool,
    priority: Option<u32>,
    table: u32,
    action: RuleAction,
    fwmark: Option<u32>,
    invert: bool,
    suppress: Option<u32>,
}

fn rule_key(r: &RuleMessage) -> RuleKey {
    RuleKey {
        v6: r.header.family == AddressFamily::Inet6,
        priority: rule_priority(r),
        table: rule_table(r),
        action: r.header.action,
        fwmark: r.attributes.iter().find_map(|a| match a {
            RuleAttribute::FwMark(m) => Some(*m),
            _ => None,
        }),
        invert: r.header.flags.contains(RuleFlags::Invert),
        // The kernel dumps "none" as u32::MAX (its -1).
        suppress: r.attributes.iter().find_map(|a| match a {
            RuleAttribute::SuppressPrefixLen(l) if *l != u32::MAX => Some(*l),
            _ => None,
        }),
    }
}

impl std::fmt::Display for RuleKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} rule", if self.v6 { "IPv6" } else { "IPv4" })?;
        if let Some(p) = self.priority {
            write!(f, " {p}:")?;
        }
        if let Some(m) = self.fwmark {
            let not = if self.invert { " not" } else { "" };
            write!(f, "{not} fwmark {m:#x}")?;
        }
        match self.table {
            MAIN_TABLE => f.write_str(" lookup main")?,
            t => write!(f, " lookup {t}")?,
        }
        if let Some(l) = self.suppress {
            write!(f, " suppress_prefixlength {l}")?;
        }
        Ok(())
    }
}

/// Adds the rule `key` describes (what the kernel dumps back as `key`).
async fn add_rule(nl: &Netlink, key: RuleKey) -> Result<(), NetlinkError> {
    let mut req = nl
        .handle()
        .rule()
        .add()
        .table_id(key.table)
        .action(key.action);
    if let Some(p) = key.priority {
        req = req.priority(p);
    }
    if let Some(m) = key.fwmark {
        req = req.fw_mark(m);
    }
    if key.invert {
        req.message_mut().header.flags |= RuleFlags::Invert;
    }
    if let Some(l) = key.suppress {
        req.message_mut()
            .attributes
            .push(RuleAttribute::SuppressPrefixLen(l));
    }
    let done = if key.v6 {
        req.v6().execute().await
    } else {
        req.v4().execute().await
    };
    done.map_err(|e| NetlinkError::new(format!("adding {key}"), e))
}

/// The three rules of a family, in order of priority.
fn wanted_rules(n: PolicyNumbers, v6: bool) -> [RuleKey; 3] {
    let rule = |priority: u32, table: u32| RuleKey {
        v6,
        priority: Some(priority),
        table,
        action: RuleAction::ToTable,
        fwmark: None,
        invert: false,
        suppress: None,
    };
    [
        rule(n.priority - 1, n.exclusion_table()),
        RuleKey {
            suppress: Some(if v6 { SUPPRESS_V6 } else { SUPPRESS_V4 }),
            ..rule(n.priority, MAIN_TABLE)
        },
        RuleKey {
            fwmark: Some(n.fwmark),
            invert: true,
            ..rule(n.priority + 1, n.table)
        },
    ]
}

impl ClientRouting {
    pub fn new(numbers: PolicyNumbers) -> Self {
        ClientRouting { numbers }
    }

    pub fn numbers(&self) -> PolicyNumbers {
        self.numbers
    }

    /// Adds `default dev <wg>` (v4 and v6) to nexd's table. Before the
    /// rules: the moment they exist, they must have somewhere to send
    /// traffic (a rule whose table has no route falls through to the main
    /// table's default route).
    pub async fn add_routes(
        &self,
        nl: &Netlink,
        wg_index: u32,
        wg_name: &str,
    ) -> Result<(), NetlinkError> {
        let n = self.numbers;
        let v4 = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
            .output_interface(wg_index)
            .scope(RouteScope::Link)
            .table_id(n.table)
            .build();
        routes::replace(nl, v4, || {
            format!("adding default dev {wg_name} table {}", n.table)
        })
        .await?;
        let v6 = RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(Ipv6Addr::UNSPECIFIED, 0)
            .output_interface(wg_index)
            .table_id(n.table)
            .build();
        routes::replace(nl, v6, || {
            format!("adding IPv6 default dev {wg_name} table {}", n.table)
        })
        .await?;
        debug!(table = n.table, "exit-node client routes added");
        Ok(())
    }

    /// Adds `unreachable default` (v4 and v6) after every other route of
    /// nexd's table. Before the rules, and removed after them.
    pub async fn add_fallback(&self, nl: &Netlink) -> Result<(), NetlinkError> {
        let table = self.numbers.table;
        // After every other route of the table, needing no device.
        fn last_unreachable<T>(b: RouteMessageBuilder<T>, table: u32) -> RouteMessage {
            b.kind(RouteType::Unreachable)
                .priority(FALLBACK_METRIC)
                .table_id(table)
                .build()
        }
        let v4 =
            RouteMessageBuilder::<Ipv4Addr>::new().destination_prefix(Ipv4Addr::UNSPECIFIED, 0);
        let v6 =
            RouteMessageBuilder::<Ipv6Addr>::new().destination_prefix(Ipv6Addr::UNSPECIFIED, 0);
        for (fam, msg) in [
            ("IPv4", last_unreachable(v4, table)),
            ("IPv6", last_unreachable(v6, table)),
        ] {
            routes::replace(nl, msg, || {
                format!("adding {fam} unreachable default table {table}")
            })
            .await?;
        }
        debug!(table, "exit-node client fallback added");
        Ok(())
    }

    /// Which of the client's objects the kernel holds now, so a change
    /// made behind nexd's back (an address gone, a rule flushed by hand)
    /// is noticed and repaired.
    pub async fn present(&self, nl: &Netlink, wg_index: u32) -> Result<Present, NetlinkError> {
        let found = routes::of_table(nl, self.numbers.table).await?;
        let has = |v6: bool, fallback: bool| {
            found.iter().any(|(is_v6, r)| {
                *is_v6 == v6
                    && r.header.destination_prefix_length == 0
                    && if fallback {
                        r.header.kind == RouteType::Unreachable
                    } else {
                        r.header.kind == RouteType::Unicast && routes::oif(r) == Some(wg_index)
                    }
            })
        };
        Ok(Present {
            routes: has(false, false) && has(true, false),
            fallback: has(false, true) && has(true, true),
            rules: self.find_rules(nl).await?.len() >= 6,
        })
    }

    /// Installs the rules (v4 and v6) and `src_valid_mark`. Idempotent:
    /// what sits at nexd's priorities ends up exactly these rules, so
    /// re-enabling never piles rules up. Only the missing rules are added,
    /// and what is not one of them is deleted after: a repair of one
    /// family's rules must not leave the other family's traffic without
    /// its rules (it went to the main table, directly, while every rule
    /// was deleted before any was added back).
    pub async fn add_rules(&self, nl: &Netlink, sysctls: &mut Sysctls) -> Result<(), NetlinkError> {
        let n = self.numbers;
        // As wg-quick: reverse-path checks honour marks, so strict
        // rp_filter does not drop the tunnel's own replies.
        if let Err(e) = sysctls.set(SRC_VALID_MARK, "1") {
            tracing::warn!(error = %e, "cannot set src_valid_mark");
        }
        let present = self.find_rules(nl).await?;
        let have: Vec<RuleKey> = present.iter().map(rule_key).collect();
        for key in [false, true].into_iter().flat_map(|v6| wanted_rules(n, v6)) {
            if !have.contains(&key) {
                add_rule(nl, key).await?;
            }
        }
        // Now that every rule is in: what is none of them (or a second
        // copy of one) goes.
        let wanted: Vec<RuleKey> = [false, true]
            .into_iter()
            .flat_map(|v6| wanted_rules(n, v6))
            .collect();
        let mut kept = Vec::new();
        let extra: Vec<RuleMessage> = present
            .into_iter()
            .filter(|r| {
                let k = rule_key(r);
                let keep = wanted.contains(&k) && !kept.contains(&k);
                if keep {
                    kept.push(k);
                }
                !keep
            })
            .collect();
        self.delete_rules(nl, extra).await?;
        info!(
            table = n.table,
            fwmark = n.fwmark,
            priorities = %format!("{}/{}", n.priority, n.priority + 1),
            "exit-node client rules installed"
        );
        Ok(())
    }

    /// Removes nexd's rules and restores `src_valid_mark`.
    pub async fn remove_rules_and_mark(
        &self,
        nl: &Netlink,
        sysctls: &mut Sysctls,
    ) -> Result<(), NetlinkError> {
        let rules = self.remove_rules(nl).await;
        sysctls.restore(SRC_VALID_MARK);
        rules
    }

    /// Removes nexd's rules, its table's routes, and restores
    /// `src_valid_mark`. Also cleans up after a crashed instance, since it
    /// finds everything by nexd's fixed numbers. Every step runs even if
    /// an earlier one failed; the first error is returned.
    pub async fn remove(&self, nl: &Netlink, sysctls: &mut Sysctls) -> Result<(), NetlinkError> {
        let rules = self.remove_rules(nl).await;
        let routes = self.delete_routes(nl, |_| true).await;
        sysctls.restore(SRC_VALID_MARK);
        rules?;
        routes?;
        debug!("exit-node client routing removed");
        Ok(())
    }

    /// Whether any of nexd's rules is installed.
    pub async fn installed(&self, nl: &Netlink) -> Result<bool, NetlinkError> {
        Ok(!self.find_rules(nl).await?.is_empty())
    }

    /// Whether nexd's table holds any route.
    pub async fn routes_installed(&self, nl: &Netlink) -> Result<bool, NetlinkError> {
        Ok(!self.find_routes(nl).await?.is_empty())
    }

    /// Every rule at nexd's three priorities that points at the main table
    /// or one of nexd's tables.
    async fn find_rules(&self, nl: &Netlink) -> Result<Vec<RuleMessage>, NetlinkError> {
        let n = self.numbers;
        let mut found = Vec::new();
        for version in [IpVersion::V4, IpVersion::V6] {
            let mut rules = nl.handle().rule().get(version).execute();
            while let Some(r) = rules
                .try_next()
                .await
                .map_err(|e| NetlinkError::new("listing policy rules", e))?
            {
                let ours = rule_priority(&r)
                    .is_some_and(|p| p + 1 >= n.priority && p <= n.priority + 1)
                    && matches!(rule_table(&r), t if t == MAIN_TABLE || t == n.table || t == n.exclusion_table());
                if ours {
                    found.push(r);
                }
            }
        }
        Ok(found)
    }

    /// Deletes every rule at nexd's three priorities that points at the
    /// main table or one of nexd's tables.
    pub async fn remove_rules(&self, nl: &Netlink) -> Result<(), NetlinkError> {
        let found = self.find_rules(nl).await?;
        self.delete_rules(nl, found).await
    }

    async fn delete_rules(
        &self,
        nl: &Netlink,
        rules: Vec<RuleMessage>,
    ) -> Result<(), NetlinkError> {
        for r in rules {
            match nl.handle().rule().del(r).execute().await {
                Ok(()) => {}
                Err(rtnetlink::Error::NetlinkError(m)) if m.raw_code().abs() == libc::ENOENT => {}
                Err(e) => return Err(NetlinkError::new("deleting a policy rule", e)),
            }
        }
        Ok(())
    }

    /// Deletes every route in nexd's table but the unreachable fallback.
    pub async fn remove_routes(&self, nl: &Netlink) -> Result<(), NetlinkError> {
        self.delete_routes(nl, |r| r.header.kind != RouteType::Unreachable)
            .await
    }

    /// Deletes the unreachable fallback of nexd's table.
    pub async fn remove_fallback(&self, nl: &Netlink) -> Result<(), NetlinkError> {
        self.delete_routes(nl, |r| r.header.kind == RouteType::Unreachable)
            .await
    }

    async fn delete_routes(
        &self,
        nl: &Netlink,
        which: impl Fn(&RouteMessage) -> bool,
    ) -> Result<(), NetlinkError> {
        let table = self.numbers.table;
        for r in self.find_routes(nl).await? {
            if which(&r) {
                routes::delete(nl, r, || format!("deleting a route of table {table}")).await?;
            }
        }
        Ok(())
    }

    /// Every route in nexd's table.
    async fn find_routes(&self, nl: &Netlink) -> Result<Vec<RouteMessage>, NetlinkError> {
        let found = routes::of_table(nl, self.numbers.table).await?;
        Ok(found.into_iter().map(|(_, r)| r).collect())
    }
}

#[cfg(test)]
mod tests {
    use netlink_packet_route::rule::RuleHeader;

    use super::*;

    /// A rule as the kernel dumps it (header table 252 with the table as
    /// an attribute, "no suppression" as u32::MAX, the mark's mask).
    fn dumped(v6: bool, priority: u32, table: u32, extra: Vec<RuleAttribute>) -> RuleMessage {
        let mut r = RuleMessage::default();
        r.header = RuleHeader {
            family: if v6 {
                AddressFamily::Inet6
            } else {
                AddressFamily::Inet
            },
            table: if table > 255 { 252 } else { table as u8 },
            action: RuleAction::ToTable,
            ..RuleHeader::default()
        };
        r.attributes = vec![
            RuleAttribute::Table(table),
            RuleAttribute::Priority(priority),
        ];
        r.attributes.extend(extra);
        r
    }

    /// What `add_rules` finds in place is recognised as its own, so a
    /// repair adds only what is missing and deletes nothing it keeps.
    #[test]
    fn each_rule_is_named_as_ip_rule_shows_it() {
        let n = PolicyNumbers::default();
        let [excl, main, table] = wanted_rules(n, false);
        assert_eq!(excl.to_string(), "IPv4 rule 28277: lookup 28281");
        assert_eq!(
            main.to_string(),
            "IPv4 rule 28278: lookup main suppress_prefixlength 7"
        );
        assert_eq!(
            table.to_string(),
            "IPv4 rule 28279: not fwmark 0x6e78 lookup 28280"
        );
        let [_, main6, _] = wanted_rules(n, true);
        assert_eq!(
            main6.to_string(),
            "IPv6 rule 28278: lookup main suppress_prefixlength 31"
        );
    }

    #[test]
    fn the_rules_the_kernel_dumps_back_are_recognised_as_nexds() {
        let n = PolicyNumbers {
            table: 28280,
            fwmark: 28280,
            priority: 28278,
        };
        for v6 in [false, true] {
            let suppress = if v6 { SUPPRESS_V6 } else { SUPPRESS_V4 };
            let mut not_marked = dumped(
                v6,
                28279,
                28280,
                vec![
                    RuleAttribute::SuppressPrefixLen(u32::MAX),
                    RuleAttribute::FwMark(28280),
                    RuleAttribute::FwMask(u32::MAX),
                ],
            );
            not_marked.header.flags |= RuleFlags::Invert;
            let found = [
                dumped(
                    v6,
                    28277,
                    28281,
                    vec![RuleAttribute::SuppressPrefixLen(u32::MAX)],
                ),
                dumped(
                    v6,
                    28278,
                    MAIN_TABLE,
                    vec![RuleAttribute::SuppressPrefixLen(suppress)],
                ),
                not_marked,
            ];
            let keys: Vec<RuleKey> = found.iter().map(rule_key).collect();
            assert_eq!(keys, wanted_rules(n, v6), "IPv6: {v6}");
            // The other family's rules are not these.
            assert!(wanted_rules(n, !v6).iter().all(|k| !keys.contains(k)));
        }
        // Without the inversion it is another rule.
        let plain = dumped(false, 28279, 28280, vec![RuleAttribute::FwMark(28280)]);
        assert!(!wanted_rules(n, false).contains(&rule_key(&plain)));
    }
}
