//! Writing a `Mesh` back as a mesh file (`nexctl mesh export`): the file
//! `parse` reads into the same `Mesh`.

use std::fmt::Write as _;

use super::{DEFAULT_LISTEN_PORT, ExitGroup, Mesh};

/// TOML string quoting (names and endpoints are plain ASCII after
/// validation, but quote properly anyway).
fn quote(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

/// The mesh file text for `mesh`, preceded by `header` comment lines.
pub fn render(mesh: &Mesh, header: &[String]) -> String {
    let mut s = String::new();
    for h in header {
        let _ = writeln!(s, "# {h}");
    }
    let _ = write!(
        s,
        "[mesh]\nipv4_prefix = {}\nipv6_prefix = {}\npersistent_keepalive = {}\nmtu = {}\nagent_port = {}\n",
        quote(&mesh.ipv4_prefix.to_string()),
        quote(&mesh.ipv6_prefix.to_string()),
        mesh.persistent_keepalive,
        mesh.mtu,
        mesh.agent_port
    );
    for d in &mesh.devices {
        let _ = write!(
            s,
            "\n[[device]]\nname = {}\npublic_key = {}\n",
            quote(&d.name),
            quote(&d.public_key.to_string())
        );
        if let Some(ep) = &d.endpoint {
            let _ = writeln!(s, "endpoint = {}", quote(&ep.to_string()));
        }
        // The parser derives the port from the endpoint, or the default.
        let implied = d.endpoint.as_ref().map_or(DEFAULT_LISTEN_PORT, |e| e.port);
        if d.listen_port != implied {
            let _ = writeln!(s, "listen_port = {}", d.listen_port);
        }
        let _ = write!(
            s,
            "ipv4 = {}\nipv6 = {}\n",
            quote(&d.ipv4.to_string()),
            quote(&d.ipv6.to_string())
        );
        if d.exit_node {
            s.push_str("exit_node = true\n");
        }
        if let Some(clients) = &d.exit_clients {
            let list: Vec<String> = clients.iter().map(|c| quote(c)).collect();
            let _ = writeln!(s, "exit_clients = [{}]", list.join(", "));
        }
        if let Some(rate) = &d.exit_rate_limit {
            let _ = writeln!(s, "exit_rate_limit = {}", quote(&rate.to_string()));
        }
        if let Some(n) = d.exit_flow_limit {
            let _ = writeln!(s, "exit_flow_limit = {n}");
        }
        if let Some(n) = d.exit_new_flow_rate {
            let _ = writeln!(s, "exit_new_flow_rate = {n}");
        }
        if let Some(rate) = &d.exit_capacity {
            let _ = writeln!(s, "exit_capacity = {}", quote(&rate.to_string()));
        }
        if let Some(m) = &d.exit_group {
            let _ = writeln!(
                s,
                "exit_group = {}\nexit_group_sync_ipv4 = {}",
                quote(&m.group),
                quote(&m.sync_ipv4.to_string())
            );
            if let Some(ip) = m.uplink_ipv4 {
                let _ = writeln!(s, "exit_group_uplink_ipv4 = {}", quote(&ip.to_string()));
            }
        }
    }
    for g in &mesh.exit_groups {
        render_group(&mut s, g);
    }
    s
}

/// One `[[exit_group]]` table; the egress prefix length only when it is
/// not the host length the parser assumes.
fn render_group(s: &mut String, g: &ExitGroup) {
    let v4 = if g.egress_ipv4.prefix_len() == 32 {
        g.egress_ipv4.addr().to_string()
    } else {
        g.egress_ipv4.to_string()
    };
    let _ = write!(
        s,
        "\n[[exit_group]]\nname = {}\negress_ipv4 = {}\n",
        quote(&g.name),
        quote(&v4)
    );
    if let Some(v6) = g.egress_ipv6 {
        let v6 = if v6.prefix_len() == 128 {
            v6.addr().to_string()
        } else {
            v6.to_string()
        };
        let _ = writeln!(s, "egress_ipv6 = {}", quote(&v6));
    }
    let _ = writeln!(
        s,
        "uplink = {}\nsync_interface = {}\nvrrp_id = {}\nadvert_interval = {}.{:02}\nunicast = {}",
        quote(&g.uplink),
        quote(&g.sync_interface),
        g.vrrp_id,
        g.advert_centis / 100,
        g.advert_centis % 100,
        g.unicast
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{keys::PrivateKey, mesh::parse};

    #[test]
    fn rendered_files_parse_back_to_the_same_mesh() {
        let text = format!(
            "[mesh]\nipv4_prefix = \"100.100.0.0/16\"\nipv6_prefix = \"fd00:1::/64\"\npersistent_keepalive = 10\nmtu = 1380\nagent_port = 4000\n\
             [[device]]\nname = \"a\"\npublic_key = \"{}\"\nendpoint = \"[2001:db8::1]:4000\"\nlisten_port = 4001\nipv4 = \"100.100.0.1\"\nipv6 = \"fd00:1::1\"\n\
             [[device]]\nname = \"b.c-d\"\npublic_key = \"{}\"\nlisten_port = 5000\nipv4 = \"100.100.0.2\"\nipv6 = \"fd00:1::2\"\n\
             [[device]]\nname = \"e\"\npublic_key = \"{}\"\nendpoint = \"exit.example.net:51820\"\nipv4 = \"100.100.0.3\"\nipv6 = \"fd00:1::3\"\n\
             exit_node = true\nexit_clients = [\"a\", \"b.c-d\"]\n\
             [[device]]\nname = \"f\"\npublic_key = \"{}\"\nipv4 = \"100.100.0.4\"\nipv6 = \"fd00:1::4\"\nexit_node = true\nexit_rate_limit = \"200mbit\"\nexit_flow_limit = 100\nexit_new_flow_rate = 20\nexit_capacity = \"1500mbit\"\n\
             exit_group = \"eu\"\nexit_group_sync_ipv4 = \"10.9.0.1\"\nexit_group_uplink_ipv4 = \"198.51.100.2\"\n\
             [[exit_group]]\nname = \"eu\"\negress_ipv4 = \"198.51.100.10/24\"\negress_ipv6 = \"2001:db8::10\"\nuplink = \"eth1\"\nsync_interface = \"sync0\"\nvrrp_id = 7\nadvert_interval = 0.25\nunicast = true\n",
            PrivateKey::generate().public_key(),
            PrivateKey::generate().public_key(),
            PrivateKey::generate().public_key(),
            PrivateKey::generate().public_key(),
        );
        let mesh = parse(&text).expect("valid");
        assert!(
            mesh.devices
                .iter()
                .any(|d| d.exit_node && d.exit_clients.is_some())
        );
        assert!(mesh.devices.iter().any(|d| d.exit_rate_limit.is_some()));
        assert!(mesh.devices.iter().any(|d| d.exit_flow_limit == Some(100)));
        assert!(mesh.devices.iter().any(|d| d.exit_capacity.is_some()));
        assert_eq!(mesh.exit_groups.len(), 1);
        assert_eq!(mesh.exit_groups[0].advert_centis, 25);
        let out = render(&mesh, &["exported".into()]);
        assert!(out.starts_with("# exported\n"));
        assert_eq!(parse(&out).expect("rendered file parses"), mesh);
    }
}
