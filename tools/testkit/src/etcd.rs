//! Direct access to the test plane's etcd (its HTTP gateway), to put objects into the
//! state no API request can: one written before a schema bound existed, or by another
//! version of the CRD. Only with the plane `hack/control-plane.sh` started.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::tenant::plane_file;

/// The etcd address of the test plane, if the tests started it.
pub fn etcd_addr() -> Option<String> {
    let port = std::fs::read_to_string(plane_file("etcd.port")?).ok()?;
    Some(format!("127.0.0.1:{}", port.trim()))
}

async fn post(addr: &str, path: &str, body: &serde_json::Value) -> serde_json::Value {
    let body = body.to_string();
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("etcd reachable");
    let req = format!(
        "POST {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let mut resp = String::new();
    s.read_to_string(&mut resp).await.expect("read");
    let json = resp.split("\r\n\r\n").nth(1).unwrap_or("{}");
    serde_json::from_str(json).unwrap_or_else(|e| panic!("etcd answered {resp:?}: {e}"))
}

/// The value stored at `key`.
pub async fn etcd_get(addr: &str, key: &str) -> Option<Vec<u8>> {
    let v = post(
        addr,
        "/v3/kv/range",
        &serde_json::json!({"key": B64.encode(key)}),
    )
    .await;
    let value = v["kvs"][0]["value"].as_str()?;
    B64.decode(value).ok()
}

/// Stores `value` at `key`.
pub async fn etcd_put(addr: &str, key: &str, value: &[u8]) {
    let body = serde_json::json!({"key": B64.encode(key), "value": B64.encode(value)});
    let v = post(addr, "/v3/kv/put", &body).await;
    assert!(v.get("header").is_some(), "etcd put failed: {v}");
}

/// The etcd key of a namespaced custom object.
pub fn object_key(group: &str, plural: &str, ns: &str, name: &str) -> String {
    format!("/registry/{group}/{plural}/{ns}/{name}")
}
