//! `GET /v1/openapi.json` against a real agent: it is valid OpenAPI 3.1, it describes exactly
//! the API's routes (the list below is the contract a client can rely on), every route it
//! describes is served, and no method it leaves out is.

use std::collections::BTreeSet;
use std::time::Duration;

use blx_tests::{Cluster, http};

const LONG: Duration = Duration::from_secs(90);

/// Every (method, path) the API serves.
const ROUTES: &[(&str, &str)] = &[
    ("get", "/v1/health"),
    ("get", "/v1/ready"),
    ("get", "/v1/metrics"),
    ("get", "/v1/openapi.json"),
    ("get", "/v1/agent/self"),
    ("post", "/v1/agent/leave"),
    ("get", "/v1/members"),
    ("get", "/v1/status"),
    ("get", "/v1/tokens"),
    ("post", "/v1/tokens"),
    ("delete", "/v1/tokens/{id}"),
    ("get", "/v1/api-tokens"),
    ("post", "/v1/api-tokens"),
    ("delete", "/v1/api-tokens/{id}"),
    ("get", "/v1/kv/{key}"),
    ("put", "/v1/kv/{key}"),
    ("delete", "/v1/kv/{key}"),
    ("get", "/v1/config"),
    ("put", "/v1/config"),
    ("get", "/v1/config/history"),
    ("post", "/v1/config/rollback"),
    ("post", "/v1/operator/transfer-leader"),
    ("get", "/v1/operator/snapshot"),
    ("put", "/v1/operator/snapshot"),
    ("get", "/v1/audit"),
    ("get", "/v1/vms"),
    ("post", "/v1/vms"),
    ("get", "/v1/vms/{name}"),
    ("delete", "/v1/vms/{name}"),
    ("get", "/v1/vms/{name}/logs"),
    ("post", "/v1/vms/{name}/{action}"),
    ("get", "/v1/nodes"),
    ("put", "/v1/nodes/{node}/labels"),
    ("post", "/v1/nodes/{node}/{action}"),
];

const METHODS: [&str; 5] = ["get", "put", "post", "delete", "patch"];

#[test]
fn the_description_is_valid_and_matches_the_routes_served() {
    let cluster = Cluster::bootstrap();
    cluster.wait_raft(1, 0, LONG);
    let a = &cluster.agents[0];
    let (code, body) = http(a.api, None, "GET", "/v1/openapi.json", b"");
    assert_eq!(code, 200, "{body}");
    let spec = oas3::from_json(&body).expect("valid OpenAPI 3.1");
    assert!(spec.openapi.starts_with("3.1"), "{}", spec.openapi);
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();

    let described: BTreeSet<(String, String)> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, item)| {
            item.as_object()
                .unwrap()
                .keys()
                .filter(|m| METHODS.contains(&m.as_str()))
                .map(move |m| (m.clone(), path.clone()))
        })
        .collect();
    let expected: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(
        described.difference(&expected).collect::<Vec<_>>(),
        Vec::<&(String, String)>::new(),
        "described but not in the contract"
    );
    assert_eq!(
        expected.difference(&described).collect::<Vec<_>>(),
        Vec::<&(String, String)>::new(),
        "in the contract but not described"
    );

    // Open routes say so; the rest ask for the bearer token; every operation has the error
    // shape as its default answer.
    for (method, path) in &described {
        let op = &doc["paths"][path][method];
        let open =
            ["/v1/health", "/v1/ready", "/v1/metrics", "/v1/openapi.json"].contains(&path.as_str());
        assert_eq!(op["security"].is_null(), open, "{method} {path}");
        assert_eq!(
            op["responses"]["default"]["content"]["application/json"]["schema"]["$ref"],
            "#/components/schemas/Error",
            "{method} {path}"
        );
    }

    let token = a.local_token();
    let concrete = |path: &str| {
        path.replace("{key}", "probe/key")
            .replace("{id}", "00000000000000aa")
            .replace("{name}", "nosuchvm")
            .replace("{node}", "nosuchnode")
            .replace("{action}", "stop")
    };
    // Every method a path leaves out is refused with 405.
    let paths: BTreeSet<&String> = described.iter().map(|(_, p)| p).collect();
    for path in paths {
        for method in METHODS {
            if described.contains(&(method.to_string(), path.clone())) {
                continue;
            }
            let (code, body) = http(
                a.api,
                Some(&token),
                &method.to_uppercase(),
                &concrete(path),
                b"",
            );
            assert_eq!(
                code, 405,
                "{method} {path} is served but not described: {body}"
            );
        }
    }
    // Every described route is served (an unknown route answers "no such route"). Leaving
    // is done last: it stops the agent.
    let mut ordered: Vec<&(String, String)> = described.iter().collect();
    ordered.sort_by_key(|(m, p)| (p == "/v1/agent/leave", m.clone(), p.clone()));
    for (method, path) in ordered {
        // No body on a GET: a handler that never reads one leaves it unread, and closing a
        // socket with unread bytes resets the connection, sometimes before the answer is read.
        let body: &[u8] = if method == "get" { b"" } else { b"{}" };
        let (code, body) = http(
            a.api,
            Some(&token),
            &method.to_uppercase(),
            &concrete(path),
            body,
        );
        assert!(
            code != 405 && !body.contains("no such route"),
            "{method} {path} is described but not served: {code} {body}"
        );
    }
}
