//! Writing a `Mesh` back as a mesh file (`nexctl mesh export`): the file
//! `parse` reads into the same `Mesh`.

use std::fmt::Write as _;

use super::{DEFAULT_LISTEN_PORT, Mesh};

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
    }
    s
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
             [[device]]\nname = \"f\"\npublic_key = \"{}\"\nipv4 = \"100.100.0.4\"\nipv6 = \"fd00:1::4\"\nexit_node = true\nexit_rate_limit = \"200mbit\"\nexit_flow_limit = 100\nexit_new_flow_rate = 20\nexit_capacity = \"1500mbit\"\n",
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
        let out = render(&mesh, &["exported".into()]);
        assert!(out.starts_with("# exported\n"));
        assert_eq!(parse(&out).expect("rendered file parses"), mesh);
    }
}
