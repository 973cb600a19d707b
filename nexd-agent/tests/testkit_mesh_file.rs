//! The test toolkit's mesh files are valid for nexd and say who may serve
//! as exit node as the tests mean it.

use nexd::{keys::PrivateKey, mesh};
use nexd_testkit::topology::{ExitRole, MeshDevice, mesh_toml, mesh_toml_with_exits};

fn devices() -> Vec<MeshDevice> {
    ["exit", "client", "peer"]
        .iter()
        .enumerate()
        .map(|(i, name)| MeshDevice {
            name: (*name).to_owned(),
            public_key: PrivateKey::generate().public_key().to_string(),
            endpoint: Some(format!("192.0.2.{}:51820", i + 1)),
            ipv4: format!("100.64.0.{}", i + 1),
            ipv6: format!("fd6e:6578:6400::{}", i + 1),
        })
        .collect()
}

#[test]
fn toolkit_mesh_files_parse_with_the_intended_exit_roles() {
    let d = devices();
    let key = |m: &mesh::Mesh, n: &str| {
        m.devices
            .iter()
            .find(|x| x.name == n)
            .map(|x| x.public_key)
            .unwrap_or_else(|| panic!("no {n}"))
    };

    let all = mesh::parse(&mesh_toml(&d)).unwrap_or_else(|p| panic!("{p:?}"));
    assert!(
        all.devices
            .iter()
            .all(|x| x.exit_node && x.exit_clients.is_none())
    );

    let only = mesh::parse(&mesh_toml_with_exits(
        &d,
        Some(&[ExitRole {
            name: "exit",
            clients: Some(&["client"]),
        }]),
    ))
    .unwrap_or_else(|p| panic!("{p:?}"));
    let (exit, client, peer) = (key(&only, "exit"), key(&only, "client"), key(&only, "peer"));
    assert!(only.serves(&exit, &client));
    assert!(!only.serves(&exit, &peer));
    assert!(!only.may_serve_exit(&peer) && !only.may_serve_exit(&client));

    let none =
        mesh::parse(&mesh_toml_with_exits(&d, Some(&[]))).unwrap_or_else(|p| panic!("{p:?}"));
    assert!(none.devices.iter().all(|x| !x.exit_node));
}
