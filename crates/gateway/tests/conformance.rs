//! fjord's own conformance-style tests for HTTPRoute (Gateway API, Core and the common Extended
//! features), one test per upstream conformance case of kubernetes-sigs/gateway-api
//! (`conformance/tests/httproute-*.go`). The upstream suite needs a Kubernetes API server; these
//! tests rebuild what each case asserts — the same kind of request gives the same backend,
//! status code, headers or redirect `Location`, and invalid objects get the same status
//! conditions and reasons — against fjord's proxy on 127.0.0.1 with echo backends, from YAML
//! (StaticServices) or, where the case is about Services/EndpointSlices or generations, from
//! fjord's store through the same controller the agent runs. Manifests and assertions are
//! fjord's own; names follow the upstream cases.
//!
//! Differences that come from the test set-up, not from fjord: listeners bind free loopback
//! ports instead of 80/443/8080, so where upstream expects "no port in Location" for a listener
//! on 80 we expect the listener's port (the spec's rule: with no scheme and no port in the
//! filter, the redirect keeps the listener port); Kubernetes `Endpoints` objects do not exist in
//! fjord (EndpointSlices only), so HTTPRouteServiceTypes covers the EndpointSlice variants.
//!
//! | upstream case | fjord test | status |
//! |---|---|---|
//! | HTTPRouteSimpleSameNamespace | proxy.rs `seed_route_splits_90_10_over_10000_requests_and_404s_elsewhere` | pass |
//! | HTTPRouteCrossNamespace | `httproute_cross_namespace` | pass |
//! | HTTPRouteExactPathMatching | `httproute_exact_path_matching` | pass |
//! | HTTPRouteHeaderMatching | `httproute_header_matching` | pass |
//! | HTTPRouteHostnameIntersection | `httproute_hostname_intersection` | pass |
//! | HTTPRouteHTTPSListener | `httproute_https_listener` (also tls.rs `https_terminates_tls_with_sni_per_hostname_and_alpn_h2`) | pass |
//! | HTTPRouteInvalidCrossNamespaceBackendRef | proxy.rs `bad_objects_are_refused_with_conditions_and_disturb_nothing` | pass |
//! | HTTPRouteInvalidCrossNamespaceParentRef | `httproute_invalid_cross_namespace_parent_ref` | pass |
//! | HTTPRouteInvalidNonExistentBackendRef | `httproute_invalid_nonexistent_backend_ref` (also proxy.rs `weights_zero_missing_backends_and_no_endpoints`) | pass |
//! | HTTPRouteInvalidBackendRefUnknownKind | `httproute_invalid_backendref_unknown_kind` | pass |
//! | HTTPRouteInvalidParentRefNotMatchingListenerPort | `httproute_invalid_parentref_not_matching_listener_port` | pass |
//! | HTTPRouteInvalidParentRefNotMatchingSectionName | `httproute_invalid_parentref_not_matching_section_name` | pass |
//! | HTTPRouteInvalidParentRefSectionNameNotMatchingPort | `httproute_invalid_parentref_section_name_not_matching_port` | pass |
//! | HTTPRouteParentRefPort | `httproute_parentref_port` | pass |
//! | HTTPRouteInvalidReferenceGrant | `httproute_invalid_reference_grant` | pass |
//! | HTTPRouteListenerHostnameMatching | `httproute_listener_hostname_matching` | pass |
//! | HTTPRouteMatching | `httproute_matching` | pass |
//! | HTTPRouteMatchingAcrossRoutes | `httproute_matching_across_routes` | pass |
//! | HTTPRouteObservedGenerationBump | `httproute_observed_generation_bump` (store) | pass |
//! | HTTPRoutePartiallyInvalidViaInvalidReferenceGrant | `httproute_partially_invalid_via_reference_grant` | pass |
//! | HTTPRouteReferenceGrant | proxy.rs `bad_objects_are_refused_with_conditions_and_disturb_nothing`, table_tests `bad_input_is_refused_per_object_with_reasons` | pass |
//! | HTTPRouteRequestHeaderModifier | `httproute_request_header_modifier` | pass |
//! | HTTPRouteServiceTypes | `httproute_service_types` (store; EndpointSlice variants) | pass |
//! | HTTPRouteDisallowedKind | `httproute_disallowed_kind` | pass |
//! | HTTPRouteWeight | proxy.rs `seed_route_splits_90_10…`, table_tests `weights_schedule_is_exact_and_zero_weights_give_500` | pass |
//! | HTTPRouteMethodMatching | `httproute_method_matching` | pass |
//! | HTTPRouteQueryParamMatching | `httproute_query_param_matching` | pass |
//! | HTTPRoutePathMatchOrder | `httproute_path_match_order` | pass |
//! | HTTPRouteRedirectHostAndStatus (+ 303/307/308 status codes) | `httproute_redirect_host_and_status` | pass |
//! | HTTPRouteRedirectPath | `httproute_redirect_path` | pass |
//! | HTTPRouteRedirectPort | `httproute_redirect_port` | pass |
//! | HTTPRouteRedirectScheme | `httproute_redirect_scheme` | pass |
//! | HTTPRouteRedirectPortAndScheme | `httproute_redirect_port_and_scheme` | pass |
//! | HTTPRouteRewriteHost | `httproute_rewrite_host` | pass |
//! | HTTPRouteRewritePath | `httproute_rewrite_path` | pass |
//! | HTTPRouteResponseHeaderModifier | `httproute_response_header_modifier` | pass |
//! | HTTPRouteRequestMirror | proxy.rs `filters_headers_redirect_rewrite_mirror_timeouts` | pass |
//! | HTTPRouteRequestMultipleMirrors | `httproute_request_multiple_mirrors` | pass |
//! | HTTPRouteRequestTimeout, HTTPRouteBackendRequestTimeout | proxy.rs `filters_headers_redirect_rewrite_mirror_timeouts` | pass |
//! | HTTPRouteBackendRequestHeaderModifier | proxy.rs `filters_headers_redirect_rewrite_mirror_timeouts` (`/perbackend`) | pass |
//! | HTTPRouteBackendProtocolH2C | proxy.rs `http2_h2c_from_clients_and_to_backends` | pass |
//! | HTTPRouteBackendProtocolWebSocket | proxy.rs (WebSocket pass-through in the streaming test) | pass |
//! | HTTPRouteHTTPSListenerDetectMisdirectedRequests | `httproute_https_listener_detect_misdirected_requests` | fixed (fjord routed by Host across listeners) |
//! | HTTPRouteNamedRule | `httproute_named_rule` | pass |
//! | GatewayHTTPListenerIsolation (routing side) | `gateway_http_listener_isolation` | pass |
//! | HTTPRouteRequestPercentageMirror | — (fractions/percent are compiled; a statistical check of async copies is not deterministic enough) | not covered |
//! | HTTPRouteCORS, HTTPRouteRetry, HTTPRouteSessionPersistence (experimental) | proxy.rs checks CORS is refused with `UnsupportedValue` | not supported |
//!
//! Every status check also asserts what upstream's `HTTPRouteMustHaveParents` compares: the
//! parent status names `fjord.dev/gateway` and carries the parentRef with `group` and `kind`
//! defaulted as the API server stores them (fixed: fjord copied the parentRef as written).
//!
//! HTTPRouteMatchingAcrossRoutes: an old upstream manifest gave `matching-part2` the hostname
//! `*.com`; with that, `example.com/v2` would have to reach part2's `/v2` rule although part1
//! names `example.com` exactly. fjord follows the HTTPRouteSpec.hostnames text (rules of the
//! route with the most specific matching hostname take precedence; a less specific hostname's
//! rules are tried when none of them matches) and uses `example.com` for part2, as other ports
//! of this case do (which hostname the newest upstream manifest uses was not verified).
mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use fjord_gateway::testing::put_manifests;
use fjord_gateway::api::{find_condition, Condition};
use fjord_gateway::StatusReport;
use http_body_util::BodyExt;

/// The namespace of the Gateways and most routes (upstream: gateway-conformance-infra).
const INFRA: &str = "infra";

/// Echo backends as upstream deploys them: infra-backend-v1..v3 in `infra`, app-backend-v1/v2
/// in `app`, web-backend in `web`; all Services on port 8080 (StaticService YAML).
async fn backends() -> Vec<String> {
    let mut docs = vec![];
    for (name, ns) in [
        ("infra-backend-v1", INFRA),
        ("infra-backend-v2", INFRA),
        ("infra-backend-v3", INFRA),
        ("app-backend-v1", "app"),
        ("app-backend-v2", "app"),
        ("web-backend", "web"),
    ] {
        let a = echo(name, ns).await;
        docs.push(static_service(name, ns, 8080, &[a]));
    }
    docs
}

const CLASS: &str = "apiVersion: gateway.networking.k8s.io/v1\nkind: GatewayClass\nmetadata: {name: fjord}\nspec: {controllerName: fjord.dev/gateway}\n";

/// A Gateway in `infra` with the given listener lines (YAML flow mappings, one per line).
fn gateway_doc(name: &str, listeners: &[String]) -> String {
    let ls: Vec<String> = listeners.iter().map(|l| format!("  - {l}\n")).collect();
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: {name}, namespace: {INFRA}}}\nspec:\n  gatewayClassName: fjord\n  listeners:\n{}",
        ls.concat()
    )
}

/// Upstream's `same-namespace` Gateway: one HTTP listener that admits routes from its own
/// namespace only.
fn same_namespace(port: u16) -> String {
    gateway_doc("same-namespace", &[format!("{{name: http, port: {port}, protocol: HTTP, allowedRoutes: {{namespaces: {{from: Same}}}}}}")])
}

/// An HTTPRoute; `spec` is the YAML body under `spec:` (indented by two spaces).
fn route(name: &str, ns: &str, spec: &str) -> String {
    format!("apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{spec}\n")
}

/// An HTTPRoute in `infra` attached to `same-namespace` with these rules (YAML list items
/// indented by two spaces).
fn infra_route(name: &str, rules: &str) -> String {
    route(name, INFRA, &format!("  parentRefs: [{{name: same-namespace}}]\n  rules:\n{rules}"))
}

/// Start a gateway with the class, the backends and `docs`.
async fn start(docs: Vec<String>) -> (fjord_gateway::Gateway, StatusReport) {
    let mut all = vec![CLASS.to_string()];
    all.extend(backends().await);
    all.extend(docs);
    gateway(&all).await
}

fn cond(st: &StatusReport, route: &str, parent: usize, t: &str) -> Condition {
    let r = st.http_routes.get(route).unwrap_or_else(|| panic!("no status for {route}: {st:#?}"));
    let p = r.parents.get(parent).unwrap_or_else(|| panic!("{route} has no parent {parent}: {r:#?}"));
    find_condition(&p.conditions, t).unwrap_or_else(|| panic!("{route}: no {t} condition: {:#?}", p.conditions)).clone()
}

#[track_caller]
fn assert_cond(c: &Condition, status: &str, reason: &str) {
    assert_eq!((c.status.as_str(), c.reason.as_str()), (status, reason), "{c:?}");
}

/// Upstream's `HTTPRouteMustHaveParents`: every parent status names fjord's controller and a
/// parentRef as the API server stores it, with `group` and `kind` defaulted.
#[track_caller]
fn parents_have_defaulted_refs(st: &StatusReport, route: &str) {
    for p in &st.http_routes[route].parents {
        assert_eq!(p.controller_name, "fjord.dev/gateway");
        assert_eq!(p.parent_ref.group.as_deref(), Some("gateway.networking.k8s.io"), "{route}: {:?}", p.parent_ref);
        assert_eq!(p.parent_ref.kind.as_deref(), Some("Gateway"), "{route}: {:?}", p.parent_ref);
    }
}

/// Upstream's `GatewayAndHTTPRoutesMustBeAccepted` + `HTTPRouteMustHaveResolvedRefsConditionsTrue`.
#[track_caller]
fn accepted_and_resolved(st: &StatusReport, route: &str) {
    parents_have_defaulted_refs(st, route);
    for (i, _) in st.http_routes[route].parents.iter().enumerate() {
        assert!(cond(st, route, i, "Accepted").is_true(), "{route}: {:?}", cond(st, route, i, "Accepted"));
        assert!(cond(st, route, i, "ResolvedRefs").is_true(), "{route}: {:?}", cond(st, route, i, "ResolvedRefs"));
    }
}

fn attached(st: &StatusReport, gw: &str, listener: &str) -> u32 {
    st.gateways[gw].listeners.iter().find(|l| l.name == listener).unwrap_or_else(|| panic!("{gw} has no listener {listener}")).attached_routes
}

/// One request through the gateway on `port`, with a Host header and extra headers.
async fn req(port: u16, method: &str, host: &str, path: &str, headers: &[(&str, &str)]) -> Resp {
    let mut h = vec![("host", host)];
    h.extend_from_slice(headers);
    send(&client(), method, &format!("http://127.0.0.1:{port}{path}"), &h).await
}

/// The request reached `backend` (the echo pod name).
#[track_caller]
fn expect_backend(r: &Resp, backend: &str, what: &str) {
    assert_eq!(r.status, 200, "{what}: {:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.echo().pod, backend, "{what}");
}

/// One request of a table: (host or method, path, headers, expected backend or status).
type Case<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)], Result<&'a str, u16>);

/// A table of (host, path, headers, expected backend or status).
async fn expect_all(port: u16, cases: &[Case<'_>]) {
    for (host, path, headers, want) in cases {
        let r = req(port, "GET", host, path, headers).await;
        let what = format!("GET {host}{path} {headers:?}");
        match want {
            Ok(b) => expect_backend(&r, b, &what),
            Err(code) => assert_eq!(r.status, *code, "{what}: {:?}", String::from_utf8_lossy(&r.body)),
        }
    }
}

const NO_HEADERS: &[(&str, &str)] = &[];

// ===================================================================== matching

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn httproute_path_match_order() {
    let port = free_port();
    // Rules are listed least specific first, so rule order alone would get every case wrong.
    let r = infra_route(
        "path-matching-order",
        r#"  - matches: [{path: {type: PathPrefix, value: /match}}]
    backendRefs: [{name: infra-backend-v3, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /match/prefix}}]
    backendRefs: [{name: infra-backend-v1, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /match/prefix/one}}]
    backendRefs: [{name: infra-backend-v2, port: 8080}]
  - matches: [{path: {type: Exact, value: /match}}]
    backendRefs: [{name: infra-backend-v1, port: 8080}]
  - matches: [{path: {type: Exact, value: /match/exact}}, {path: {type: PathPrefix, value: /match/exact/one/more}}]
    backendRefs: [{name: infra-backend-v2, port: 8080}]
  - matches: [{path: {type: Exact, value: /match/exact/one}}]
    backendRefs: [{name: infra-backend-v3, port: 8080}]"#,
    );
    let (_gw, st) = start(vec![same_namespace(port), r]).await;
    accepted_and_resolved(&st, "infra/path-matching-order");
    expect_all(
        port,
        &[
            ("example.com", "/match/exact/one", NO_HEADERS, Ok("infra-backend-v3")),
            ("example.com", "/match/exact", NO_HEADERS, Ok("infra-backend-v2")),
            ("example.com", "/match", NO_HEADERS, Ok("infra-backend-v1")),
            ("example.com", "/match/prefix/one/any", NO_HEADERS, Ok("infra-backend-v2")),
            ("example.com", "/match/prefix/any", NO_HEADERS, Ok("infra-backend-v1")),
            ("example.com", "/match/any", NO_HEADERS, Ok("infra-backend-v3")),
            ("example.com", "/match/exact/one/more/x", NO_HEADERS, Ok("infra-backend-v2")),
            ("example.com", "/match/exact/two", NO_HEADERS, Ok("infra-backend-v3")),
            ("example.com", "/matchx", NO_HEADERS, Err(404)),
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn httproute_exact_path_matching() {
    let port = free_port();
    let r = infra_route(
        "exact-matching",
        r#"  - matches: [{path: {type: Exact, value: /one}}]
    backendRefs: [{name: infra-backend-v1, port: 8080}]
  - matches: [{path: {type: Exact, value: /two}}]
    backendRefs: [{name: infra-backend-v2, port: 8080}]"#,
    );
    let (_gw, st) = start(vec![same_namespace(port), r]).await;
    accepted_and_resolved(&st, "infra/exact-matching");
    expect_all(
        port,
        &[
            ("x", "/one", NO_HEADERS, Ok("infra-backend-v1")),
            ("x", "/two", NO_HEADERS, Ok("infra-backend-v2")),
            ("x", "/", NO_HEADERS, Err(404)),
            ("x", "/one/example", NO_HEADERS, Err(404)),
            ("x", "/two/", NO_HEADERS, Err(404)),
            ("x", "/One", NO_HEADERS, Err(404)),
            ("x", "/onetwo", NO_HEADERS, Err(404)),
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn httproute_header_matching() {
    let port = free_port();
    let r = infra_route(
        "header-matching",
        r#"  - matches: [{headers: [{name: Version, value: one}]}]
    backendRefs: [{name: infra-backend-v1, port: 8080}]
  - matches: [{headers: [{name: version, value: two}]}]
    backendRefs: [{name: infra-backend-v2, port: 8080}]
  - matches: [{headers: [{name: Version, value: two}, {name: Color, value: orange}]}]
    backendRefs: [{name: infra-backend-v1, port: 8080}]
  - matches: [{headers: [{name: Color, value: blue}]}, {headers: [{name: Color, value: green}]}]
    backendRefs: [{name: infra-backend-v1, port: 8080}]
  - matches: [{headers: [{name: Color, value: red}]}, {headers: [{name: Color, value: yellow}]}]
    backendRefs: [{name: infra-backend-v2, port: 8080}]
  - matches: [{headers: [{name: x-env, type: RegularExpression, value: "prod|staging-[0-9]+"}]}]
    backendRefs: [{name: infra-backend-v3, port: 8080}]"#,
    );
    let (_gw, st) = start(vec![same_namespace(port), r]).await;
    accepted_and_resolved(&st, "infra/header-matching");
    expect_all(
        port,
        &[
            ("x", "/", &[("Version", "one")], Ok("infra-backend-v1")),
            ("x", "/", &[("version", "one")], Ok("infra-backend-v1")),
            ("x", "/", &[("VERSION", "two")], Ok("infra-backend-v2")),
            // more header matches win
            ("x", "/", &[("Version", "two"), ("Color", "orange")], Ok("infra-backend-v1")),
            ("x", "/", &[("Version", "two"), ("Color", "black")], Ok("infra-backend-v2")),
            ("x", "/", &[("Color", "blue")], Ok("infra-backend-v1")),
            ("x", "/", &[("Color", "green")], Ok("infra-backend-v1")),
            ("x", "/", &[("Color", "red")], Ok("infra-backend-v2")),
            ("x", "/", &[("Color", "yellow")], Ok("infra-backend-v2")),
            ("x", "/", &[("x-env", "staging-12")], Ok("infra-backend-v3")),
            // values are case-sensitive, regular expressions are anchored
            ("x", "/", &[("Version", "ONE")], Err(404)),
            ("x", "/", &[("Color", "Blue")], Err(404)),
            ("x", "/", &[("x-env", "preprod")], Err(404)),
            ("x", "/", &[("x-env", "staging-1x")], Err(404)),
            ("x", "/", NO_HEADERS, Err(404)),
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn httproute_query_param_matching() {
    let port = free_port();
    let r = infra_route(
        "query-param-matching",
        r#"  - matches: [{queryParams: [{name: animal, value: whale}]}]
    backendRefs: [{name: infra-backend-v1, port: 8080}]
  - matches: [{queryParams: [{name: animal, value: dolphin}]}]
    backendRefs: [{name: infra-backend-v2, port: 8080}]
  - matches: [{queryParams: [{name: animal, value: dolphin}, {name: color, value: blue}]}, {queryParams: [{name: ANIMAL, value: Whale}]}]
    backendRefs: [{name: infra-backend-v3, port: 8080}]
  - matches: [{queryParams: [{name: id, type: RegularExpression, value: "[0-9]{3}"}]}]
    backendRefs: [{name: infra-backend-v1, port: 8080}]"#,
    );
    let (_gw, st) = start(vec![same_namespace(port), r]).await;
    accepted_and_resolved(&st, "infra/query-param-matching");
    expect_all(
        port,
        &[
            ("x", "/?animal=whale", NO_HEADERS, Ok("infra-backend-v1")),
            ("x", "/?animal=dolphin", NO_HEADERS, Ok("infra-backend-v2")),
            ("x", "/?animal=dolphin&color=blue", NO_HEADERS, Ok("infra-backend-v3")),
            ("x", "/?color=blue&animal=dolphin", NO_HEADERS, Ok("infra-backend-v3")),
            ("x", "/?animal=dolphin&color=yellow", NO_HEADERS, Ok("infra-backend-v2")),
            // names and values are case-sensitive
            ("x", "/?ANIMAL=Whale", NO_HEADERS, Ok("infra-backend-v3")),
            ("x", "/?animal=Whale", NO_HEADERS, Err(404)),
            ("x", "/?Animal=whale", NO_HEADERS, Err(404)),
            // only the first value of a repeated parameter counts
            ("x", "/?animal=whale&animal=dolphin", NO_HEADERS, Ok("infra-backend-v1")),
            ("x", "/?id=123", NO_HEADERS, Ok("infra-backend-v1")),
            ("x", "/?id=1234", NO_HEADERS, Err(404)),
            ("x", "/", NO_HEADERS, Err(404)),
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn httproute_method_matching() {
    let port = free_port();
    let r = infra_route(
        "method-matching",
        r#"  - matches: [{method: POST}]
    backendRefs: [{name: infra-backend-v1, port: 8080}]
  - matches: [{method: GET}]
    backendRefs: [{name: infra-backend-v2, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /path1}, method: GET}]
    backendRefs: [{name: infra-backend-v1, port: 8080}]
  - matches: [{headers: [{name: version, value: one}], method: PUT}]
    backendRefs: [{name: infra-backend-v2, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /path2}, headers: [{name: version, value: two}], method: POST}]
    backendRefs: [{name: infra-backend-v3, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /path3}, method: DELETE}, {path: {type: PathPrefix, value: /path4}, method: PATCH}]
    backendRefs: [{name: infra-backend-v3, port: 8080}]"#,
    );
    let (_gw, st) = start(vec![same_namespace(port), r]).await;
    accepted_and_resolved(&st, "infra/method-matching");
    let cases: &[Case] = &[
        ("POST", "/", NO_HEADERS, Ok("infra-backend-v1")),
        ("GET", "/", NO_HEADERS, Ok("infra-backend-v2")),
        ("HEAD", "/", NO_HEADERS, Err(404)),
        ("GET", "/path1", NO_HEADERS, Ok("infra-backend-v1")),
        ("PUT", "/", &[("version", "one")], Ok("infra-backend-v2")),
        ("PUT", "/", &[("version", "two")], Err(404)),
        ("POST", "/path2", &[("version", "two")], Ok("infra-backend-v3")),
        ("POST", "/path2", NO_HEADERS, Ok("infra-backend-v1")),
        ("DELETE", "/path3", NO_HEADERS, Ok("infra-backend-v3")),
        ("PATCH", "/path4", NO_HEADERS, Ok("infra-backend-v3")),
        ("PATCH", "/path3", NO_HEADERS, Err(404)),
        ("DELETE", "/path4", NO_HEADERS, Err(404)),
    ];
    for (method, path, headers, want) in cases {
        let r = req(port, method, "x", path, headers).await;
        let what = format!("{method} {path} {headers:?}");
        match want {
            Ok(b) => {
                expect_backend(&r, b, &what);
                assert_eq!(r.echo().method, *method, "{what}");
            }
            Err(code) => assert_eq!(r.status, *code, "{what}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn httproute_matching() {
    let port = free_port();
    // Several matches in one rule are ORed; a header-only match has the default path `/`.
    let r = infra_route(
        "matching",
        r#"  - matches: [{path: {type: PathPrefix, value: /}}, {headers: [{name: version, value: one}]}]
    backendRefs: [{name: infra-backend-v1, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /v2}}, {headers: [{name: version, value: two}]}]
    backendRefs: [{name: infra-backend-v2, port: 8080}]"#,
    );
    let (_gw, st) = start(vec![same_namespace(port), r]).await;
    accepted_and_resolved(&st, "infra/matching");
    expect_all(
        port,
        &[
            ("x", "/", NO_HEADERS, Ok("infra-backend-v1")),
            ("x", "/example", NO_HEADERS, Ok("infra-backend-v1")),
            ("x", "/", &[("version", "one")], Ok("infra-backend-v1")),
            ("x", "/v2", NO_HEADERS, Ok("infra-backend-v2")),
            ("x", "/v2/example", NO_HEADERS, Ok("infra-backend-v2")),
            ("x", "/v2example", NO_HEADERS, Ok("infra-backend-v1")),
            ("x", "/", &[("version", "two")], Ok("infra-backend-v2")),
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn httproute_matching_across_routes() {
    let port = free_port();
    let part1 = route(
        "matching-part1",
        INFRA,
        r#"  parentRefs: [{name: same-namespace}]
  hostnames: [example.com, example.net]
  rules:
  - matches: [{path: {type: PathPrefix, value: /}}, {headers: [{name: version, value: one}]}]
    backendRefs: [{name: infra-backend-v1, port: 8080}]"#,
    );
    let part2 = route(
        "matching-part2",
        INFRA,
        r#"  parentRefs: [{name: same-namespace}]
  hostnames: [example.com]
  rules:
  - matches: [{path: {type: PathPrefix, value: /v2}}, {headers: [{name: version, value: two}]}]
    backendRefs: [{name: infra-backend-v2, port: 8080}]"#,
    );
    let (_gw, st) = start(vec![same_namespace(port), part1, part2]).await;
    accepted_and_resolved(&st, "infra/matching-part1");
    accepted_and_resolved(&st, "infra/matching-part2");
    assert_eq!(attached(&st, "infra/same-namespace", "http"), 2);
    expect_all(
        port,
        &[
            ("example.com", "/", NO_HEADERS, Ok("infra-backend-v1")),
            ("example.com", "/example", NO_HEADERS, Ok("infra-backend-v1")),
            ("example.net", "/example", NO_HEADERS, Ok("infra-backend-v1")),
            ("example.com", "/example", &[("version", "one")], Ok("infra-backend-v1")),
            ("example.com", "/v2", NO_HEADERS, Ok("infra-backend-v2")),
            // part2 serves example.com only
            ("example.net", "/v2", NO_HEADERS, Ok("infra-backend-v1")),
            ("example.com", "/v2/example", NO_HEADERS, Ok("infra-backend-v2")),
            ("example.com", "/", &[("version", "two")], Ok("infra-backend-v2")),
            ("example.org", "/", NO_HEADERS, Err(404)),
        ],
    )
    .await;
}

// ===================================================================== hostnames

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn httproute_listener_hostname_matching() {
    let port = free_port();
    let l = |name: &str, host: &str| format!("{{name: {name}, port: {port}, protocol: HTTP, hostname: \"{host}\", allowedRoutes: {{namespaces: {{from: Same}}}}}}");
    let gw = gateway_doc("listener-hostnames", &[l("listener-1", "bar.com"), l("listener-2", "foo.bar.com"), l("listener-3", "*.bar.com"), l("listener-4", "*.foo.com")]);
    let to = |name: &str, sections: &[&str], backend: &str| {
        let parents: Vec<String> = sections.iter().map(|s| format!("{{name: listener-hostnames, namespace: {INFRA}, sectionName: {s}}}")).collect();
        route(name, INFRA, &format!("  parentRefs: [{}]\n  rules:\n  - backendRefs: [{{name: {backend}, port: 8080}}]", parents.join(", ")))
    };
    let (_gw, st) = start(vec![
        gw,
        to("backend-v1", &["listener-1"], "infra-backend-v1"),
        to("backend-v2", &["listener-2"], "infra-backend-v2"),
        to("backend-v3", &["listener-3", "listener-4"], "infra-backend-v3"),
    ])
    .await;
    for r in ["infra/backend-v1", "infra/backend-v2", "infra/backend-v3"] {
        accepted_and_resolved(&st, r);
    }
    for (l, n) in [("listener-1", 1), ("listener-2", 1), ("listener-3", 1), ("listener-4", 1)] {
        assert_eq!(attached(&st, "infra/listener-hostnames", l), n, "{l}");
    }
    expect_all(
        port,
        &[
            ("bar.com", "/", NO_HEADERS, Ok("infra-backend-v1")),
            ("foo.bar.com", "/", NO_HEADERS, Ok("infra-backend-v2")),
            ("baz.bar.com", "/", NO_HEADERS, Ok("infra-backend-v3")),
            ("boo.bar.com", "/", NO_HEADERS, Ok("infra-backend-v3")),
            ("multiple.prefixes.bar.com", "/", NO_HEADERS, Ok("infra-backend-v3")),
            ("multiple.prefixes.foo.com", "/", NO_HEADERS, Ok("infra-backend-v3")),
            ("BAR.com:8080", "/", NO_HEADERS, Ok("infra-backend-v1")),
            ("foo.com", "/", NO_HEADERS, Err(404)),
            ("no.matching.host", "/", NO_HEADERS, Err(404)),
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn httproute_hostname_intersection() {
    let port = free_port();
    let port_all = free_port();
    let l = |name: &str, host: &str| format!("{{name: {name}, port: {port}, protocol: HTTP, hostname: \"{host}\", allowedRoutes: {{namespaces: {{from: Same}}}}}}");
    let gw = gateway_doc("hostname-intersection", &[l("listener-1", "very.specific.com"), l("listener-2", "*.wildcard.io"), l("listener-3", "*.anotherwildcard.io")]);
    let gw_all = gateway_doc("hostname-intersection-all", &[format!("{{name: any, port: {port_all}, protocol: HTTP}}")]);
    let r = |name: &str, gw: &str, hosts: &str, prefix: &str, backend: &str| {
        route(
            name,
            INFRA,
            &format!("  parentRefs: [{{name: {gw}}}]\n  hostnames: {hosts}\n  rules:\n  - matches: [{{path: {{type: PathPrefix, value: {prefix}}}}}]\n    backendRefs: [{{name: {backend}, port: 8080}}]"),
        )
    };
    let (_gw, st) = start(vec![
        gw,
        gw_all,
        r("specific-host-matches-listener-specific-host", "hostname-intersection", r#"[non.matching.com, "*.nonmatchingwildcard.io", very.specific.com]"#, "/s1", "infra-backend-v1"),
        r("specific-host-matches-listener-wildcard-host", "hostname-intersection", "[non.matching.com, wildcard.io, foo.wildcard.io, bar.wildcard.io, foo.bar.wildcard.io]", "/s2", "infra-backend-v2"),
        r("wildcard-host-matches-listener-specific-host", "hostname-intersection", r#"[non.matching.com, "*.specific.com"]"#, "/s3", "infra-backend-v3"),
        r("wildcard-host-matches-listener-wildcard-host", "hostname-intersection", r#"["*.anotherwildcard.io"]"#, "/s4", "infra-backend-v1"),
        r("no-intersecting-hosts", "hostname-intersection", "[specific.but.wrong.com, wildcard.io]", "/s5", "infra-backend-v2"),
        r("intersection-all", "hostname-intersection-all", r#"[first.com, "*.first.com", second.com, "*.second.com"]"#, "/", "infra-backend-v2"),
    ])
    .await;
    for r in [
        "specific-host-matches-listener-specific-host",
        "specific-host-matches-listener-wildcard-host",
        "wildcard-host-matches-listener-specific-host",
        "wildcard-host-matches-listener-wildcard-host",
        "intersection-all",
    ] {
        accepted_and_resolved(&st, &format!("infra/{r}"));
    }
    // routes that intersect no listener hostname are not accepted and not counted
    assert_cond(&cond(&st, "infra/no-intersecting-hosts", 0, "Accepted"), "False", "NoMatchingListenerHostname");
    parents_have_defaulted_refs(&st, "infra/no-intersecting-hosts");
    assert_eq!(attached(&st, "infra/hostname-intersection", "listener-1"), 2);
    assert_eq!(attached(&st, "infra/hostname-intersection", "listener-2"), 1);
    assert_eq!(attached(&st, "infra/hostname-intersection", "listener-3"), 1);
    for l in &st.gateways["infra/hostname-intersection"].listeners {
        assert!(find_condition(&l.conditions, "Accepted").unwrap().is_true(), "{l:?}");
        assert!(find_condition(&l.conditions, "ResolvedRefs").unwrap().is_true(), "{l:?}");
        assert_eq!(l.supported_kinds.iter().map(|k| k.kind.as_str()).collect::<Vec<_>>(), ["HTTPRoute"]);
    }
    expect_all(
        port,
        &[
            ("very.specific.com", "/s1", NO_HEADERS, Ok("infra-backend-v1")),
            // the port in Host does not take part in hostname matching
            ("very.specific.com:1234", "/s1", NO_HEADERS, Ok("infra-backend-v1")),
            ("non.matching.com", "/s1", NO_HEADERS, Err(404)),
            ("foo.nonmatchingwildcard.io", "/s1", NO_HEADERS, Err(404)),
            ("foo.wildcard.io", "/s1", NO_HEADERS, Err(404)),
            ("very.specific.com", "/non-matching-prefix", NO_HEADERS, Err(404)),
            ("foo.wildcard.io", "/s2", NO_HEADERS, Ok("infra-backend-v2")),
            ("bar.wildcard.io", "/s2", NO_HEADERS, Ok("infra-backend-v2")),
            ("foo.bar.wildcard.io", "/s2", NO_HEADERS, Ok("infra-backend-v2")),
            ("non.matching.com", "/s2", NO_HEADERS, Err(404)),
            ("wildcard.io", "/s2", NO_HEADERS, Err(404)),
            ("baz.wildcard.io", "/s2", NO_HEADERS, Err(404)),
            ("very.specific.com", "/s2", NO_HEADERS, Err(404)),
            ("very.specific.com", "/s3", NO_HEADERS, Ok("infra-backend-v3")),
            ("non.matching.com", "/s3", NO_HEADERS, Err(404)),
            ("foo.specific.com", "/s3", NO_HEADERS, Err(404)),
            ("foo.wildcard.io", "/s3", NO_HEADERS, Err(404)),
            ("foo.anotherwildcard.io", "/s4", NO_HEADERS, Ok("infra-backend-v1")),
            ("bar.anotherwildcard.io", "/s4", NO_HEADERS, Ok("infra-backend-v1")),
            ("foo.bar.anotherwildcard.io", "/s4", NO_HEADERS, Ok("infra-backend-v1")),
            ("anotherwildcard.io", "/s4", NO_HEADERS, Err(404)),
            ("foo.wildcard.io", "/s4", NO_HEADERS, Err(404)),
            ("very.specific.com", "/s4", NO_HEADERS, Err(404)),
            ("specific.but.wrong.com", "/s5", NO_HEADERS, Err(404)),
            ("wildcard.io", "/s5", NO_HEADERS, Err(404)),
        ],
    )
    .await;
    // a listener without hostname takes the route's hostnames as they are
    expect_all(
        port_all,
        &[
            ("first.com", "/", NO_HEADERS, Ok("infra-backend-v2")),
            ("sub.first.com", "/", NO_HEADERS, Ok("infra-backend-v2")),
            ("second.com", "/", NO_HEADERS, Ok("infra-backend-v2")),
            ("sub.second.com", "/", NO_HEADERS, Ok("infra-backend-v2")),
            ("third.com", "/", NO_HEADERS, Err(404)),
            ("sub.third.com", "/", NO_HEADERS, Err(404)),
        ],
    )
    .await;
}

// ===================================================================== parents and namespaces

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn httproute_cross_namespace() {
    let port = free_port();
    let gw = gateway_doc(
        "backend-namespaces",
        &[format!("{{name: http, port: {port}, protocol: HTTP, allowedRoutes: {{namespaces: {{from: Selector, selector: {{matchLabels: {{gateway-conformance: backend}}}}}}}}}}")],
    );
    let ns = "apiVersion: v1\nkind: Namespace\nmetadata: {name: web, labels: {gateway-conformance: backend}}\n".to_string();
    let r = route("cross-namespace", "web", &format!("  parentRefs: [{{name: backend-namespaces, namespace: {INFRA}}}]\n  rules:\n  - backendRefs: [{{name: web-backend, port: 8080}}]"));
    let stray = route("stray", "app", &format!("  parentRefs: [{{name: backend-namespaces, namespace: {INFRA}}}]\n  rules:\n  - backendRefs: [{{name: app-backend-v1, port: 8080}}]"));
    let (_gw, st) = start(vec![gw, ns, r, stray]).await;
    accepted_and_resolved(&st, "web/cross-namespace");
    assert_cond(&cond(&st, "app/stray", 0, "Accepted"), "False", "NotAllowedByListeners");
    assert_eq!(attached(&st, "infra/backend-namespaces", "http"), 1);
    let r = req(port, "GET", "x", "/", NO_HEADERS).await;
    expect_backend(&r, "web-backend", "GET /");
    assert_eq!(r.echo().namespace, "web");
}

/// Upstream checks of a route that must not attach: Accepted=False with `reason`,
/// ResolvedRefs still True, no parent accepted, and the Gateway counts no route.
#[track_caller]
fn not_attached(st: &StatusReport, route: &str, gw: &str, reason: &str) {
    parents_have_defaulted_refs(st, route);
    for (i, _) in st.http_routes[route].parents.iter().enumerate() {
        assert_cond(&cond(st, route, i, "Accepted"), "False", reason);
        assert!(cond(st, route, i, "ResolvedRefs").is_true(), "{:?}", cond(st, route, i, "ResolvedRefs"));
    }
    for l in &st.gateways[gw].listeners {
        assert_eq!(l.attached_routes, 0, "{gw}/{}", l.name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn httproute_invalid_cross_namespace_parent_ref() {
    let port = free_port();
    let r = route(
        "invalid-cross-namespace-parent-ref",
        "web",
        &format!("  parentRefs: [{{name: same-namespace, namespace: {INFRA}}}]\n  rules:\n  - backendRefs: [{{name: web-backend, port: 8080}}]"),
    );
    let (_gw, st) = start(vec![same_namespace(port), r]).await;
    not_attached(&st, "web/invalid-cross-namespace-parent-ref", "infra/same-namespace", "NotAllowedByListeners");
    assert_eq!(req(port, "GET", "x", "/", NO_HEADERS).await.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn httproute_invalid_parentref_not_matching_listener_port() {
    let port = free_port();
    let other = if port == u16::MAX { port - 1 } else { port + 1 };
    let r = route(
        "listener-not-matching-route-port",
        INFRA,
        &format!("  parentRefs: [{{name: same-namespace, port: {other}}}]\n  rules:\n  - backendRefs: [{{name: infra-backend-v1, port: 8080}}]"),
    );
    let (_gw, st) = start(vec![same_namespace(port), r]).await;
    not_attached(&st, "infra/listener-not-matching-route-port", "infra/same-namespace", "NoMatchingParent");
    assert_eq!(req(port, "GET", "x", "/", NO_HEADERS).await.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn httproute_invalid_parentref_not_matching_section_name() {
    let port = free_port();
    let r = route(
        "httproute-listener-not-matching-section-name",
        INFRA,
        "  parentRefs: [{name: same-namespace, sectionName: nonexistent}]\n  rules:\n  - backendRefs: [{name: infra-backend-v1, port: 8080}]",
    );
    let (_gw, st) = start(vec![same_namespace(port), r]).await;
    not_attached(&st, "infra/httproute-listener-not-matching-section-name", "infra/same-namespace", "NoMatchingParent");
    assert_eq!(req(port, "GET", "x", "/", NO_HEADERS).await.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn httproute_invalid_parentref_section_name_not_matching_port() {
    let port = free_port();
    let other = if port == u16::MAX { port - 1 } else { port + 1 };
    let r = route(
        "section-name-not-matching-port",
        INFRA,
        &format!("  parentRefs: [{{name: same-namespace, sectionName: http, port: {other}}}]\n  rules:\n  - backendRefs: [{{name: infra-backend-v1, port: 8080}}]"),
    );
    let (_gw, st) = start(vec![same_namespace(port), r]).await;
    not_attached(&st, "infra/section-name-not-matching-port", "infra/same-namespace", "NoMatchingParent");
    assert_eq!(req(port, "GET", "x", "/", NO_HEADERS).await.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn httproute_parentref_port() {
    let port = free_port();
    let port2 = free_port();
    let gw = gateway_doc(
        "two-ports",
        &[
            format!("{{name: first, port: {port}, protocol: HTTP, allowedRoutes: {{namespaces: {{from: Same}}}}}}"),
            format!("{{name: second, port: {port2}, protocol: HTTP, allowedRoutes: {{namespaces: {{from: Same}}}}}}"),
        ],
    );
    let by_port = route("by-port", INFRA, &format!("  parentRefs: [{{name: two-ports, port: {port2}}}]\n  rules:\n  - backendRefs: [{{name: infra-backend-v1, port: 8080}}]"));
    let by_both = route(
        "by-section-and-port",
        INFRA,
        &format!("  parentRefs: [{{name: two-ports, sectionName: first, port: {port}}}]\n  rules:\n  - backendRefs: [{{name: infra-backend-v2, port: 8080}}]"),
    );
    let (_gw, st) = start(vec![gw, by_port, by_both]).await;
    accepted_and_resolved(&st, "infra/by-port");
    accepted_and_resolved(&st, "infra/by-section-and-port");
    assert_eq!(attached(&st, "infra/two-ports", "first"), 1);
    assert_eq!(attached(&st, "infra/two-ports", "second"), 1);
    expect_backend(&req(port, "GET", "x", "/", NO_HEADERS).await, "infra-backend-v2", "first listener");
    expect_backend(&req(port2, "GET", "x", "/", NO_HEADERS).await, "infra-backend-v1", "second listener");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn httproute_disallowed_kind() {
    let port = free_port();
    let port2 = free_port();
    // No listener admits HTTPRoutes: a TLS listener for TLSRoutes and an HTTP listener whose
    // allowedRoutes.kinds names another kind only.
    let gw = gateway_doc(
        "tlsroutes-only",
        &[
            format!("{{name: tls, port: {port}, protocol: TLS, tls: {{mode: Passthrough}}, allowedRoutes: {{namespaces: {{from: Same}}, kinds: [{{kind: TLSRoute}}]}}}}"),
            format!("{{name: http, port: {port2}, protocol: HTTP, allowedRoutes: {{namespaces: {{from: Same}}, kinds: [{{kind: GRPCRoute}}]}}}}"),
        ],
    );
    let r = route("disallowed-kind", INFRA, "  parentRefs: [{name: tlsroutes-only}]\n  rules:\n  - backendRefs: [{name: infra-backend-v1, port: 8080}]");
    let (_gw, st) = start(vec![gw, r]).await;
    not_attached(&st, "infra/disallowed-kind", "infra/tlsroutes-only", "NotAllowedByListeners");
    // GatewayInvalidRouteKind's side of it: the HTTP listener names the kind it cannot serve
    let http = st.gateways["infra/tlsroutes-only"].listeners.iter().find(|l| l.name == "http").unwrap();
    let rr = find_condition(&http.conditions, "ResolvedRefs").unwrap();
    assert_cond(rr, "False", "InvalidRouteKinds");
    assert!(http.supported_kinds.is_empty(), "{http:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn httproute_observed_generation_bump() {
    let port = free_port();
    let route_v = |backend: &str| infra_route("observed-generation-bump", &format!("  - backendRefs: [{{name: {backend}, port: 8080}}]"));
    let s = StoreSetup::new().await;
    s.apply(&[same_namespace(port), route_v("one")]).await;
    let st1 = s.route_status("observed-generation-bump").await;
    s.apply(&[route_v("two")]).await;
    let st2 = s.route_status("observed-generation-bump").await;
    for (st, gen) in [(&st1, 1), (&st2, 2)] {
        let conds = st["parents"][0]["conditions"].as_array().unwrap();
        assert!(!conds.is_empty());
        for c in conds {
            assert_eq!(c["observedGeneration"], gen, "every condition reports the latest generation: {st}");
            assert!(c["lastTransitionTime"].is_string(), "{c}");
        }
        let acc = conds.iter().find(|c| c["type"] == "Accepted").unwrap();
        assert_eq!(acc["status"], "True", "{acc}");
    }
    assert_eq!(who(port).await.as_deref(), Some("two"), "the new spec is served");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn httproute_service_types() {
    let port = free_port();
    let s = StoreSetup::new().await;
    let e = s.echo_port;
    let svc = |name: &str, extra: &str| {
        format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {INFRA}}}\nspec:\n{extra}  ports: [{{name: first-port, port: 8080, targetPort: 3000}}]\n")
    };
    let slice = |name: &str, svc: &str| {
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}, namespace: {INFRA}, labels: {{kubernetes.io/service-name: {svc}}}}}\naddressType: IPv4\n\
             ports: [{{name: first-port, port: {e}}}]\nendpoints: [{{addresses: [127.0.0.1], conditions: {{ready: true, serving: true, terminating: false}}}}]\n"
        )
    };
    let rule = |path: &str, svc: &str| format!("  - matches: [{{path: {{value: /{path}}}}}]\n    backendRefs: [{{name: {svc}, port: 8080}}]\n");
    s.apply(&[
        same_namespace(port),
        // headless with a selector: the slice is the one the endpoint controller makes
        svc("headless", "  clusterIP: None\n  selector: {app: infra-backend-v1}\n"),
        slice("headless-abcde", "headless"),
        // no selector: EndpointSlices written by hand
        svc("manual-endpointslices", ""),
        slice("manual-endpointslices-1", "manual-endpointslices"),
        svc("headless-manual-endpointslices", "  clusterIP: None\n"),
        slice("headless-manual-endpointslices-1", "headless-manual-endpointslices"),
        svc("cluster-ip", "  selector: {app: infra-backend-v1}\n"),
        slice("cluster-ip-abcde", "cluster-ip"),
        infra_route(
            "service-types",
            &[
                rule("headless", "headless"),
                rule("manual-endpointslices", "manual-endpointslices"),
                rule("headless-manual-endpointslices", "headless-manual-endpointslices"),
                rule("cluster-ip", "cluster-ip"),
            ]
            .concat(),
        ),
    ])
    .await;
    let st = s.route_status("service-types").await;
    let conds = st["parents"][0]["conditions"].as_array().unwrap();
    for t in ["Accepted", "ResolvedRefs"] {
        let c = conds.iter().find(|c| c["type"] == t).unwrap();
        assert_eq!(c["status"], "True", "{c}");
    }
    for path in ["headless", "manual-endpointslices", "headless-manual-endpointslices", "cluster-ip"] {
        let r = get(&client(), &format!("http://127.0.0.1:{port}/{path}")).await;
        expect_backend(&r, "infra-backend-v1", path);
    }
}

/// A gateway fed from an embedded store through the controller the agent runs: manifests are
/// written as `fjordctl apply` writes them (generation carried over), then one sync builds the
/// table, binds the listeners and writes status.
struct StoreSetup {
    _dir: tempfile::TempDir,
    store: Arc<dyn fjord_store::Store>,
    ctl: fjord_gateway::controller::Controller,
    /// An echo backend (pod `infra-backend-v1`) for EndpointSlices to point at.
    echo_port: u16,
    /// Echo backends `one` and `two` as Services with EndpointSlices (port 8080).
    services: Vec<String>,
}

impl StoreSetup {
    async fn new() -> StoreSetup {
        let dir = tempfile::tempdir().unwrap();
        let store = fjord_store::open(&format!("embedded:{}", dir.path().join("s.redb").display())).await.unwrap();
        let gw = fjord_gateway::Gateway::new(fjord_gateway::GatewayOptions { listen_ip: "127.0.0.1".parse().unwrap(), access_log: false, ..Default::default() });
        let ctl = fjord_gateway::controller::Controller::new(store.clone(), gw, "127.0.0.1".parse().unwrap());
        let echo_port = echo("infra-backend-v1", INFRA).await.port();
        let mut services = vec![CLASS.to_string()];
        for name in ["one", "two"] {
            let p = echo(name, INFRA).await.port();
            services.push(format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {INFRA}}}\nspec:\n  ports: [{{name: http, port: 8080}}]\n---\n\
                 apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-1, namespace: {INFRA}, labels: {{kubernetes.io/service-name: {name}}}}}\n\
                 addressType: IPv4\nports: [{{name: http, port: {p}}}]\nendpoints: [{{addresses: [127.0.0.1]}}]\n"
            ));
        }
        StoreSetup { _dir: dir, store, ctl, echo_port, services }
    }

    /// Apply `docs` (plus, the first time, the class and the `one`/`two` Services) and sync.
    async fn apply(&self, docs: &[String]) {
        let first = self.store.get(&fjord_model::keys::object("gatewayclasses", "", "fjord")).await.unwrap().is_none();
        let mut all: Vec<String> = if first { self.services.clone() } else { vec![] };
        all.extend(docs.iter().cloned());
        put_manifests(self.store.as_ref(), &all.join("---\n"), "2026-01-01T00:00:00Z").await;
        let report = self.ctl.sync().await.expect("sync");
        assert!(report.unavailable_ports.is_empty(), "{report:?}");
    }

    /// The HTTPRoute `infra/name`'s status as written to the store.
    async fn route_status(&self, name: &str) -> serde_json::Value {
        let kv = self.store.get(&fjord_model::keys::status("httproutes", INFRA, name)).await.unwrap().unwrap_or_else(|| panic!("no status for {name}"));
        serde_json::from_slice(&kv.value).unwrap()
    }
}

/// The echo pod that answers `GET /` on `port`.
async fn who(port: u16) -> Option<String> {
    let r = get(&client(), &format!("http://127.0.0.1:{port}/")).await;
    (r.status == 200).then(|| r.echo().pod)
}

// ===================================================================== backend references

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn httproute_invalid_nonexistent_backend_ref() {
    let port = free_port();
    let r = infra_route(
        "invalid-nonexistent-backend-ref",
        "  - matches: [{path: {value: /v2}}]\n    backendRefs: [{name: nonexistent, port: 8080}]\n  - backendRefs: [{name: infra-backend-v1, port: 8080}]",
    );
    let (_gw, st) = start(vec![same_namespace(port), r]).await;
    let key = "infra/invalid-nonexistent-backend-ref";
    assert!(cond(&st, key, 0, "Accepted").is_true());
    assert_cond(&cond(&st, key, 0, "ResolvedRefs"), "False", "BackendNotFound");
    assert_eq!(req(port, "GET", "x", "/v2", NO_HEADERS).await.status, 500);
    expect_backend(&req(port, "GET", "x", "/", NO_HEADERS).await, "infra-backend-v1", "valid sibling rule");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn httproute_invalid_backendref_unknown_kind() {
    let port = free_port();
    let r = infra_route(
        "invalid-backend-ref-unknown-kind",
        "  - matches: [{path: {value: /v2}}]\n    backendRefs: [{group: unknownkind.example.com, kind: NonExistent, name: infra-backend-v2, port: 8080}]\n  - backendRefs: [{name: infra-backend-v1, port: 8080}]",
    );
    let (_gw, st) = start(vec![same_namespace(port), r]).await;
    let key = "infra/invalid-backend-ref-unknown-kind";
    assert!(cond(&st, key, 0, "Accepted").is_true());
    assert_cond(&cond(&st, key, 0, "ResolvedRefs"), "False", "InvalidKind");
    assert_eq!(req(port, "GET", "x", "/v2", NO_HEADERS).await.status, 500);
    expect_backend(&req(port, "GET", "x", "/", NO_HEADERS).await, "infra-backend-v1", "valid sibling rule");
}

fn grant(name: &str, ns: &str, from_kind: &str, from_ns: &str, to_name: Option<&str>) -> String {
    let to = match to_name {
        Some(n) => format!("{{group: \"\", kind: Service, name: {n}}}"),
        None => "{group: \"\", kind: Service}".to_string(),
    };
    format!(
        "apiVersion: gateway.networking.k8s.io/v1beta1\nkind: ReferenceGrant\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  from: [{{group: gateway.networking.k8s.io, kind: {from_kind}, namespace: {from_ns}}}]\n  to: [{to}]\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn httproute_invalid_reference_grant() {
    let port = free_port();
    let r = infra_route("reference-grant", "  - backendRefs: [{name: app-backend-v1, namespace: app, port: 8080}]");
    // None of these grants covers infra/HTTPRoute → app/Service app-backend-v1.
    let grants = vec![
        grant("wrong-namespace", INFRA, "HTTPRoute", INFRA, None),
        grant("wrong-service", "app", "HTTPRoute", INFRA, Some("app-backend-v2")),
        grant("wrong-from-kind", "app", "Gateway", INFRA, None),
        grant("wrong-from-namespace", "app", "HTTPRoute", "web", None),
    ];
    let mut docs = vec![same_namespace(port), r];
    docs.extend(grants);
    let (_gw, st) = start(docs).await;
    assert!(cond(&st, "infra/reference-grant", 0, "Accepted").is_true());
    assert_cond(&cond(&st, "infra/reference-grant", 0, "ResolvedRefs"), "False", "RefNotPermitted");
    assert_eq!(req(port, "GET", "x", "/", NO_HEADERS).await.status, 500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn httproute_partially_invalid_via_reference_grant() {
    let port = free_port();
    let r = infra_route(
        "invalid-reference-grant",
        "  - backendRefs: [{name: app-backend-v1, namespace: app, port: 8080}]\n  - matches: [{path: {value: /v2}}]\n    backendRefs: [{name: app-backend-v2, namespace: app, port: 8080}]",
    );
    let g = grant("only-v1", "app", "HTTPRoute", INFRA, Some("app-backend-v1"));
    let (_gw, st) = start(vec![same_namespace(port), r, g]).await;
    let key = "infra/invalid-reference-grant";
    assert!(cond(&st, key, 0, "Accepted").is_true());
    assert_cond(&cond(&st, key, 0, "ResolvedRefs"), "False", "RefNotPermitted");
    assert_eq!(req(port, "GET", "x", "/v2", NO_HEADERS).await.status, 500);
    let r = req(port, "GET", "x", "/", NO_HEADERS).await;
    expect_backend(&r, "app-backend-v1", "granted sibling");
    assert_eq!(r.echo().namespace, "app");
}

// ===================================================================== filters

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn httproute_request_header_modifier() {
    let port = free_port();
    let r = infra_route(
        "request-header-modifier",
        r#"  - matches: [{path: {value: /set}}]
    filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: X-Header-Set, value: set-overwrites-values}]}}]
    backendRefs: [{name: infra-backend-v1, port: 8080}]
  - matches: [{path: {value: /add}}]
    filters: [{type: RequestHeaderModifier, requestHeaderModifier: {add: [{name: X-Header-Add, value: add-appends-values}]}}]
    backendRefs: [{name: infra-backend-v1, port: 8080}]
  - matches: [{path: {value: /remove}}]
    filters: [{type: RequestHeaderModifier, requestHeaderModifier: {remove: [X-Header-Remove]}}]
    backendRefs: [{name: infra-backend-v1, port: 8080}]
  - matches: [{path: {value: /multiple}}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{name: X-Header-Set-1, value: header-set-1}, {name: X-Header-Set-2, value: header-set-2}]
        add: [{name: X-Header-Add-1, value: header-add-1}, {name: X-Header-Add-2, value: header-add-2}, {name: X-Header-Add-3, value: header-add-3}]
        remove: [X-Header-Remove-1, X-Header-Remove-2]
    backendRefs: [{name: infra-backend-v1, port: 8080}]
  - matches: [{path: {value: /case-insensitivity}}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{name: X-Header-Set, value: header-set}]
        add: [{name: X-Header-Add, value: header-add}, {name: x-lowercase-add, value: lowercase-add}, {name: x-Mixedcase-ADD-1, value: mixedcase-add-1}, {name: X-mixeDcase-add-2, value: mixedcase-add-2}, {name: X-UPPERCASE-ADD, value: uppercase-add}]
        remove: [X-Header-Remove]
    backendRefs: [{name: infra-backend-v1, port: 8080}]"#,
    );
    let (_gw, st) = start(vec![same_namespace(port), r]).await;
    accepted_and_resolved(&st, "infra/request-header-modifier");
    let got = |r: &Resp, n: &str| r.echo().headers.get(n).cloned().unwrap_or_default();
    let r = req(port, "GET", "x", "/set", &[("Some-Other-Header", "val")]).await;
    assert_eq!(got(&r, "x-header-set"), ["set-overwrites-values"]);
    assert_eq!(got(&r, "some-other-header"), ["val"]);
    let r = req(port, "GET", "x", "/set", &[("X-Header-Set", "some-other-value")]).await;
    assert_eq!(got(&r, "x-header-set"), ["set-overwrites-values"]);
    let r = req(port, "GET", "x", "/add", &[("Some-Other-Header", "val")]).await;
    assert_eq!(got(&r, "x-header-add"), ["add-appends-values"]);
    let r = req(port, "GET", "x", "/add", &[("X-Header-Add", "some-other-value")]).await;
    assert_eq!(got(&r, "x-header-add"), ["some-other-value", "add-appends-values"], "add appends to the existing value");
    let r = req(port, "GET", "x", "/remove", &[("X-Header-Remove", "val")]).await;
    assert!(got(&r, "x-header-remove").is_empty());
    let r = req(port, "GET", "x", "/multiple", &[("X-Header-Set-2", "set-val-2"), ("X-Header-Add-2", "add-val-2"), ("X-Header-Remove-2", "remove-val-2"), ("Another-Header", "another-header-val")]).await;
    assert_eq!(got(&r, "x-header-set-1"), ["header-set-1"]);
    assert_eq!(got(&r, "x-header-set-2"), ["header-set-2"]);
    assert_eq!(got(&r, "x-header-add-1"), ["header-add-1"]);
    assert_eq!(got(&r, "x-header-add-2"), ["add-val-2", "header-add-2"]);
    assert_eq!(got(&r, "x-header-add-3"), ["header-add-3"]);
    assert_eq!(got(&r, "another-header"), ["another-header-val"]);
    assert!(got(&r, "x-header-remove-1").is_empty() && got(&r, "x-header-remove-2").is_empty());
    let r = req(port, "GET", "x", "/case-insensitivity", &[("x-header-set", "original-val-set"), ("x-header-add", "original-val-add"), ("x-header-remove", "x")]).await;
    assert_eq!(got(&r, "x-header-set"), ["header-set"]);
    assert_eq!(got(&r, "x-header-add"), ["original-val-add", "header-add"]);
    assert_eq!(got(&r, "x-lowercase-add"), ["lowercase-add"]);
    assert_eq!(got(&r, "x-mixedcase-add-1"), ["mixedcase-add-1"]);
    assert_eq!(got(&r, "x-mixedcase-add-2"), ["mixedcase-add-2"]);
    assert_eq!(got(&r, "x-uppercase-add"), ["uppercase-add"]);
    assert!(got(&r, "x-header-remove").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn httproute_response_header_modifier() {
    let port = free_port();
    // The echo backend answers with `content-type: application/json` and `x-echo-pod`.
    let r = infra_route(
        "response-header-modifier",
        r#"  - matches: [{path: {value: /set}}]
    filters: [{type: ResponseHeaderModifier, responseHeaderModifier: {set: [{name: X-Header-Set, value: set-overwrites-values}, {name: Content-Type, value: text/plain}]}}]
    backendRefs: [{name: infra-backend-v1, port: 8080}]
  - matches: [{path: {value: /add}}]
    filters: [{type: ResponseHeaderModifier, responseHeaderModifier: {add: [{name: X-Header-Add, value: add-appends-values}, {name: X-Echo-Pod, value: added}]}}]
    backendRefs: [{name: infra-backend-v1, port: 8080}]
  - matches: [{path: {value: /remove}}]
    filters: [{type: ResponseHeaderModifier, responseHeaderModifier: {remove: [X-Echo-POD]}}]
    backendRefs: [{name: infra-backend-v1, port: 8080}]
  - matches: [{path: {value: /multiple}}]
    filters:
    - type: ResponseHeaderModifier
      responseHeaderModifier:
        set: [{name: X-Header-Set-1, value: header-set-1}, {name: X-Header-Set-2, value: header-set-2}]
        add: [{name: X-Header-Add-1, value: header-add-1}, {name: x-header-ADD-2, value: header-add-2}]
        remove: [x-echo-pod, Content-Type]
    backendRefs: [{name: infra-backend-v1, port: 8080}]
  - matches: [{path: {value: /redirect}}]
    filters:
    - {type: RequestRedirect, requestRedirect: {hostname: example.org}}
    - {type: ResponseHeaderModifier, responseHeaderModifier: {set: [{name: X-Header-Set, value: on-redirect}]}}"#,
    );
    let (_gw, st) = start(vec![same_namespace(port), r]).await;
    accepted_and_resolved(&st, "infra/response-header-modifier");
    let all = |r: &Resp, n: &str| r.headers.get_all(n).iter().map(|v| v.to_str().unwrap().to_string()).collect::<Vec<_>>();
    let r = req(port, "GET", "x", "/set", NO_HEADERS).await;
    assert_eq!(r.status, 200);
    assert_eq!(all(&r, "x-header-set"), ["set-overwrites-values"]);
    assert_eq!(all(&r, "content-type"), ["text/plain"], "set replaces a header the backend sent");
    let r = req(port, "GET", "x", "/add", NO_HEADERS).await;
    assert_eq!(all(&r, "x-header-add"), ["add-appends-values"]);
    assert_eq!(all(&r, "x-echo-pod"), ["infra-backend-v1", "added"], "add keeps the backend's value");
    let r = req(port, "GET", "x", "/remove", NO_HEADERS).await;
    assert_eq!(r.status, 200);
    assert!(all(&r, "x-echo-pod").is_empty());
    let r = req(port, "GET", "x", "/multiple", NO_HEADERS).await;
    assert_eq!(all(&r, "x-header-set-1"), ["header-set-1"]);
    assert_eq!(all(&r, "x-header-set-2"), ["header-set-2"]);
    assert_eq!(all(&r, "x-header-add-1"), ["header-add-1"]);
    assert_eq!(all(&r, "x-header-add-2"), ["header-add-2"]);
    assert!(all(&r, "x-echo-pod").is_empty() && all(&r, "content-type").is_empty());
    assert_eq!(r.echo().pod, "infra-backend-v1", "the body is untouched");
    let r = req(port, "GET", "x", "/redirect", NO_HEADERS).await;
    assert_eq!(r.status, 302);
    assert_eq!(all(&r, "x-header-set"), ["on-redirect"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn httproute_rewrite_host() {
    let port = free_port();
    let r = route(
        "rewrite-host",
        INFRA,
        r#"  parentRefs: [{name: same-namespace}]
  hostnames: [rewrite.example]
  rules:
  - matches: [{path: {value: /one}}]
    filters: [{type: URLRewrite, urlRewrite: {hostname: one.example.org}}]
    backendRefs: [{name: infra-backend-v1, port: 8080}]
  - filters: [{type: URLRewrite, urlRewrite: {hostname: example.org}}]
    backendRefs: [{name: infra-backend-v2, port: 8080}]"#,
    );
    let (_gw, st) = start(vec![same_namespace(port), r]).await;
    accepted_and_resolved(&st, "infra/rewrite-host");
    let r = req(port, "GET", "rewrite.example", "/one", NO_HEADERS).await;
    expect_backend(&r, "infra-backend-v1", "/one");
    assert_eq!((r.echo().host.as_str(), r.echo().path.as_str()), ("one.example.org", "/one"));
    let r = req(port, "GET", "rewrite.example", "/", NO_HEADERS).await;
    expect_backend(&r, "infra-backend-v2", "/");
    assert_eq!(r.echo().host, "example.org");
    assert_eq!(req(port, "GET", "example.org", "/", NO_HEADERS).await.status, 404, "matching uses the client's host");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn httproute_rewrite_path() {
    let port = free_port();
    let hdrs = "    - type: RequestHeaderModifier\n      requestHeaderModifier:\n        set: [{name: X-Header-Set, value: set-overwrites-values}]\n        add: [{name: X-Header-Add, value: header-val-1}, {name: X-Header-Add-Append, value: header-val-2}]\n        remove: [X-Header-Remove]\n";
    let r = infra_route(
        "rewrite-path",
        &format!(
            r#"  - matches: [{{path: {{type: PathPrefix, value: /prefix/one}}}}]
    filters: [{{type: URLRewrite, urlRewrite: {{path: {{type: ReplacePrefixMatch, replacePrefixMatch: /one}}}}}}]
    backendRefs: [{{name: infra-backend-v1, port: 8080}}]
  - matches: [{{path: {{type: PathPrefix, value: /strip-prefix}}}}]
    filters: [{{type: URLRewrite, urlRewrite: {{path: {{type: ReplacePrefixMatch, replacePrefixMatch: /}}}}}}]
    backendRefs: [{{name: infra-backend-v1, port: 8080}}]
  - matches: [{{path: {{type: PathPrefix, value: /full/one}}}}]
    filters: [{{type: URLRewrite, urlRewrite: {{path: {{type: ReplaceFullPath, replaceFullPath: /one}}}}}}]
    backendRefs: [{{name: infra-backend-v1, port: 8080}}]
  - matches: [{{path: {{type: PathPrefix, value: /full/rewrite-path-and-modify-headers}}}}]
    filters:
    - {{type: URLRewrite, urlRewrite: {{path: {{type: ReplaceFullPath, replaceFullPath: /test}}}}}}
{hdrs}    backendRefs: [{{name: infra-backend-v1, port: 8080}}]
  - matches: [{{path: {{type: PathPrefix, value: /prefix/rewrite-path-and-modify-headers}}}}]
    filters:
    - {{type: URLRewrite, urlRewrite: {{path: {{type: ReplacePrefixMatch, replacePrefixMatch: /prefix}}}}}}
{hdrs}    backendRefs: [{{name: infra-backend-v1, port: 8080}}]"#
        ),
    );
    let (_gw, st) = start(vec![same_namespace(port), r]).await;
    accepted_and_resolved(&st, "infra/rewrite-path");
    for (path, want) in [
        ("/prefix/one/two", "/one/two"),
        ("/prefix/one", "/one"),
        ("/prefix/one/", "/one/"),
        ("/strip-prefix/three", "/three"),
        ("/strip-prefix", "/"),
        ("/strip-prefix/", "/"),
        ("/full/one/two", "/one"),
        ("/full/one", "/one"),
        ("/prefix/one/two?q=1", "/one/two"),
    ] {
        let r = req(port, "GET", "x", path, NO_HEADERS).await;
        expect_backend(&r, "infra-backend-v1", path);
        assert_eq!(r.echo().path, want, "{path}");
    }
    assert_eq!(req(port, "GET", "x", "/prefix/one/two?q=1", NO_HEADERS).await.echo().query, "q=1", "the query is kept");
    let sent = [("X-Header-Remove", "remove-val"), ("X-Header-Add-Append", "append-val-1"), ("X-Header-Set", "set-val")];
    for (path, want) in [("/full/rewrite-path-and-modify-headers/test", "/test"), ("/prefix/rewrite-path-and-modify-headers/one", "/prefix/one")] {
        let e = req(port, "GET", "x", path, &sent).await.echo();
        assert_eq!(e.path, want, "{path}");
        assert_eq!(e.headers["x-header-add"], ["header-val-1"]);
        assert_eq!(e.headers["x-header-add-append"], ["append-val-1", "header-val-2"]);
        assert_eq!(e.headers["x-header-set"], ["set-overwrites-values"]);
        assert!(!e.headers.contains_key("x-header-remove"));
    }
}

/// The redirect a request gets: (status, Location).
async fn redirect(port: u16, host: &str, path: &str) -> (u16, String) {
    let r = req(port, "GET", host, path, NO_HEADERS).await;
    (r.status, r.header("location").unwrap_or_default().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn httproute_redirect_host_and_status() {
    let port = free_port();
    let r = infra_route(
        "redirect-host-and-status",
        r#"  - matches: [{path: {value: /hostname-redirect}}]
    filters: [{type: RequestRedirect, requestRedirect: {hostname: example.org}}]
  - matches: [{path: {value: /host-and-status}}]
    filters: [{type: RequestRedirect, requestRedirect: {hostname: example.org, statusCode: 301}}]
  - matches: [{path: {value: /status-302}}]
    filters: [{type: RequestRedirect, requestRedirect: {statusCode: 302}}]
  - matches: [{path: {value: /status-303}}]
    filters: [{type: RequestRedirect, requestRedirect: {hostname: example.org, statusCode: 303}}]
  - matches: [{path: {value: /status-307}}]
    filters: [{type: RequestRedirect, requestRedirect: {hostname: example.org, statusCode: 307}}]
  - matches: [{path: {value: /status-308}}]
    filters: [{type: RequestRedirect, requestRedirect: {hostname: example.org, statusCode: 308}}]"#,
    );
    let (_gw, st) = start(vec![same_namespace(port), r]).await;
    accepted_and_resolved(&st, "infra/redirect-host-and-status");
    let here = |p: &str| format!("http://example.org:{port}{p}");
    assert_eq!(redirect(port, "x", "/hostname-redirect").await, (302, here("/hostname-redirect")));
    assert_eq!(redirect(port, "x", "/hostname-redirect/sub?a=b").await, (302, here("/hostname-redirect/sub?a=b")));
    assert_eq!(redirect(port, "x", "/host-and-status").await, (301, here("/host-and-status")));
    assert_eq!(redirect(port, "client.example", "/status-302").await, (302, format!("http://client.example:{port}/status-302")));
    assert_eq!(redirect(port, "x", "/status-303").await, (303, here("/status-303")));
    assert_eq!(redirect(port, "x", "/status-307").await, (307, here("/status-307")));
    assert_eq!(redirect(port, "x", "/status-308").await, (308, here("/status-308")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn httproute_redirect_path() {
    let port = free_port();
    let r = infra_route(
        "redirect-path",
        r#"  - matches: [{path: {type: PathPrefix, value: /original-prefix}}]
    filters: [{type: RequestRedirect, requestRedirect: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /replacement-prefix}}}]
  - matches: [{path: {type: PathPrefix, value: /full}}]
    filters: [{type: RequestRedirect, requestRedirect: {path: {type: ReplaceFullPath, replaceFullPath: /full-path-replacement}}}]
  - matches: [{path: {type: PathPrefix, value: /path-and-host}}]
    filters: [{type: RequestRedirect, requestRedirect: {hostname: example.org, path: {type: ReplacePrefixMatch, replacePrefixMatch: /replacement-prefix}}}]
  - matches: [{path: {type: PathPrefix, value: /path-and-status}}]
    filters: [{type: RequestRedirect, requestRedirect: {statusCode: 301, path: {type: ReplacePrefixMatch, replacePrefixMatch: /replacement-prefix}}}]
  - matches: [{path: {type: PathPrefix, value: /full-path-and-host}}]
    filters: [{type: RequestRedirect, requestRedirect: {hostname: example.org, path: {type: ReplaceFullPath, replaceFullPath: /replacement-full}}}]
  - matches: [{path: {type: PathPrefix, value: /full-path-and-status}}]
    filters: [{type: RequestRedirect, requestRedirect: {statusCode: 301, path: {type: ReplaceFullPath, replaceFullPath: /replacement-full}}}]
  - matches: [{path: {type: PathPrefix, value: /strip}}]
    filters: [{type: RequestRedirect, requestRedirect: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /}}}]"#,
    );
    let (_gw, st) = start(vec![same_namespace(port), r]).await;
    accepted_and_resolved(&st, "infra/redirect-path");
    let at = |host: &str, p: &str| format!("http://{host}:{port}{p}");
    assert_eq!(redirect(port, "x", "/original-prefix/lemon").await, (302, at("x", "/replacement-prefix/lemon")));
    assert_eq!(redirect(port, "x", "/original-prefix/lemon?k=v").await, (302, at("x", "/replacement-prefix/lemon?k=v")));
    assert_eq!(redirect(port, "x", "/full/path/original").await, (302, at("x", "/full-path-replacement")));
    assert_eq!(redirect(port, "x", "/path-and-host").await, (302, at("example.org", "/replacement-prefix")));
    assert_eq!(redirect(port, "x", "/path-and-status").await, (301, at("x", "/replacement-prefix")));
    assert_eq!(redirect(port, "x", "/full-path-and-host").await, (302, at("example.org", "/replacement-full")));
    assert_eq!(redirect(port, "x", "/full-path-and-status").await, (301, at("x", "/replacement-full")));
    assert_eq!(redirect(port, "x", "/strip/a/b").await, (302, at("x", "/a/b")));
    assert_eq!(redirect(port, "x", "/strip").await, (302, at("x", "/")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn httproute_redirect_port() {
    let port = free_port();
    let r = infra_route(
        "redirect-port",
        r#"  - matches: [{path: {value: /port}}]
    filters: [{type: RequestRedirect, requestRedirect: {port: 8083}}]
  - matches: [{path: {value: /port-and-host}}]
    filters: [{type: RequestRedirect, requestRedirect: {hostname: example.org, port: 8083}}]
  - matches: [{path: {value: /port-and-status}}]
    filters: [{type: RequestRedirect, requestRedirect: {port: 8083, statusCode: 301}}]
  - matches: [{path: {value: /port-and-host-and-status}}]
    filters: [{type: RequestRedirect, requestRedirect: {port: 8083, hostname: example.org, statusCode: 302}}]"#,
    );
    let (_gw, st) = start(vec![same_namespace(port), r]).await;
    accepted_and_resolved(&st, "infra/redirect-port");
    assert_eq!(redirect(port, "x", "/port").await, (302, "http://x:8083/port".into()));
    assert_eq!(redirect(port, "x", "/port-and-host").await, (302, "http://example.org:8083/port-and-host".into()));
    assert_eq!(redirect(port, "x", "/port-and-status").await, (301, "http://x:8083/port-and-status".into()));
    assert_eq!(redirect(port, "x", "/port-and-host-and-status").await, (302, "http://example.org:8083/port-and-host-and-status".into()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn httproute_redirect_scheme() {
    let port = free_port();
    let r = infra_route(
        "redirect-scheme",
        r#"  - matches: [{path: {value: /scheme}}]
    filters: [{type: RequestRedirect, requestRedirect: {scheme: https}}]
  - matches: [{path: {value: /scheme-and-host}}]
    filters: [{type: RequestRedirect, requestRedirect: {hostname: example.org, scheme: https}}]
  - matches: [{path: {value: /scheme-and-status}}]
    filters: [{type: RequestRedirect, requestRedirect: {scheme: https, statusCode: 301}}]
  - matches: [{path: {value: /scheme-and-host-and-status}}]
    filters: [{type: RequestRedirect, requestRedirect: {scheme: https, statusCode: 302, hostname: example.org}}]"#,
    );
    let (_gw, st) = start(vec![same_namespace(port), r]).await;
    accepted_and_resolved(&st, "infra/redirect-scheme");
    // a scheme without a port redirects to the scheme's well-known port (not the listener's)
    assert_eq!(redirect(port, "x", "/scheme").await, (302, "https://x/scheme".into()));
    assert_eq!(redirect(port, "x", "/scheme-and-host").await, (302, "https://example.org/scheme-and-host".into()));
    assert_eq!(redirect(port, "x", "/scheme-and-status").await, (301, "https://x/scheme-and-status".into()));
    assert_eq!(redirect(port, "x", "/scheme-and-host-and-status").await, (302, "https://example.org/scheme-and-host-and-status".into()));
}

/// Rules for HTTPRouteRedirectPortAndScheme: `/scheme-S-and-port-P` redirects to example.org
/// with scheme S and port P (`nil` = not set).
fn port_and_scheme_rules() -> String {
    let mut rules = String::new();
    for scheme in ["nil", "http", "https"] {
        for p in ["nil", "80", "443", "8080", "8443"] {
            let mut f = vec!["hostname: example.org".to_string()];
            if scheme != "nil" {
                f.push(format!("scheme: {scheme}"));
            }
            if p != "nil" {
                f.push(format!("port: {p}"));
            }
            rules.push_str(&format!(
                "  - matches: [{{path: {{type: Exact, value: /scheme-{scheme}-and-port-{p}}}}}]\n    filters: [{{type: RequestRedirect, requestRedirect: {{{}}}}}]\n",
                f.join(", ")
            ));
        }
    }
    rules
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn httproute_redirect_port_and_scheme() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let port = free_port();
    let tls_port = free_port();
    let secret = tls_secret("tls-validity-checks-certificate", &["example.org"]);
    let https_gw = gateway_doc(
        "same-namespace-with-https-listener",
        &[format!("{{name: https, port: {tls_port}, protocol: HTTPS, hostname: example.org, tls: {{certificateRefs: [{{name: tls-validity-checks-certificate}}]}}, allowedRoutes: {{namespaces: {{from: Same}}}}}}")],
    );
    let r80 = infra_route("http-route-for-http-listener", &port_and_scheme_rules());
    let r443 = route("http-route-for-https-listener", INFRA, &format!("  parentRefs: [{{name: same-namespace-with-https-listener}}]\n  hostnames: [example.org]\n  rules:\n{}", port_and_scheme_rules()));
    let (_gw, st) = start(vec![same_namespace(port), https_gw, secret, r80, r443]).await;
    accepted_and_resolved(&st, "infra/http-route-for-http-listener");
    accepted_and_resolved(&st, "infra/http-route-for-https-listener");

    // HTTP listener on `port`: no scheme and no port keep the listener's scheme and port; a
    // scheme alone takes its well-known port; well-known ports are left out of Location.
    let http_cases = [
        ("nil", "nil", format!("http://example.org:{port}")),
        ("nil", "80", "http://example.org".to_string()),
        ("nil", "8080", "http://example.org:8080".to_string()),
        ("nil", "443", "http://example.org:443".to_string()),
        ("https", "nil", "https://example.org".to_string()),
        ("https", "443", "https://example.org".to_string()),
        ("https", "8443", "https://example.org:8443".to_string()),
        ("http", "nil", "http://example.org".to_string()),
        ("http", "8080", "http://example.org:8080".to_string()),
    ];
    for (scheme, p, want) in http_cases {
        let path = format!("/scheme-{scheme}-and-port-{p}");
        let (status, loc) = redirect(port, "example.org", &path).await;
        assert_eq!((status, loc), (302, format!("{want}{path}")), "HTTP listener {path}");
    }
    // HTTPS listener on `tls_port`
    let https_cases = [
        ("nil", "nil", format!("https://example.org:{tls_port}")),
        ("nil", "443", "https://example.org".to_string()),
        ("nil", "8443", "https://example.org:8443".to_string()),
        ("http", "nil", "http://example.org".to_string()),
        ("http", "80", "http://example.org".to_string()),
        ("http", "8080", "http://example.org:8080".to_string()),
        ("https", "nil", "https://example.org".to_string()),
    ];
    for (scheme, p, want) in https_cases {
        let path = format!("/scheme-{scheme}-and-port-{p}");
        let r = tls_get(tls_port, "example.org", "example.org", &path).await;
        assert_eq!((r.status, r.header("location").unwrap_or_default()), (302, format!("{want}{path}").as_str()), "HTTPS listener {path}");
    }
}

/// A `kubernetes.io/tls` Secret in `infra` with a fresh self-signed certificate for `hosts`.
fn tls_secret(name: &str, hosts: &[&str]) -> String {
    let ck = rcgen::generate_simple_self_signed(hosts.iter().map(|h| h.to_string()).collect::<Vec<_>>()).unwrap();
    let indent = |s: String| s.lines().map(|l| format!("    {l}")).collect::<Vec<_>>().join("\n");
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}, namespace: {INFRA}}}\ntype: kubernetes.io/tls\nstringData:\n  tls.crt: |\n{}\n  tls.key: |\n{}\n",
        indent(ck.cert.pem()),
        indent(ck.key_pair.serialize_pem())
    )
}

/// Accepts any server certificate (the tests check routing, not PKI).
#[derive(Debug)]
struct AnyCert(Arc<rustls::crypto::CryptoProvider>);
impl rustls::client::danger::ServerCertVerifier for AnyCert {
    fn verify_server_cert(&self, _: &rustls::pki_types::CertificateDer<'_>, _: &[rustls::pki_types::CertificateDer<'_>], _: &rustls::pki_types::ServerName<'_>, _: &[u8], _: rustls::pki_types::UnixTime) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(&self, m: &[u8], c: &rustls::pki_types::CertificateDer<'_>, d: &rustls::DigitallySignedStruct) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(&self, m: &[u8], c: &rustls::pki_types::CertificateDer<'_>, d: &rustls::DigitallySignedStruct) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// GET `path` over TLS with SNI `sni` and Host `host` (any certificate accepted), HTTP/1.1.
async fn tls_get(port: u16, sni: &str, host: &str, path: &str) -> Resp {
    use rustls::pki_types::ServerName;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(ServerName::try_from(sni.to_string()).unwrap(), tcp).await.expect("TLS handshake");
    let (mut s, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await.unwrap();
    tokio::spawn(conn);
    let req = http::Request::builder().uri(path).header("host", host).body(empty()).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(20), s.send_request(req)).await.expect("answer in time").unwrap();
    let (status, version, headers) = (resp.status().as_u16(), resp.version(), resp.headers().clone());
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    Resp { status, headers, body, version }
}

/// A backend that records the paths it receives, for RequestMirror.
async fn recorder() -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<String>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let tx = tx.clone();
                    async move {
                        let path = req.uri().path().to_string();
                        let _ = req.into_body().collect().await;
                        let _ = tx.send(path);
                        Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(Bytes::from_static(b"mirror"))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(hyper_util::rt::TokioIo::new(tcp), svc).await;
            });
        }
    });
    (a, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn httproute_request_multiple_mirrors() {
    let port = free_port();
    let (m1, mut rx1) = recorder().await;
    let (m2, mut rx2) = recorder().await;
    let r = infra_route(
        "request-multiple-mirrors",
        r#"  - matches: [{path: {value: /multi-mirror}}]
    filters:
    - {type: RequestMirror, requestMirror: {backendRef: {name: mirror-1, port: 8080}}}
    - {type: RequestMirror, requestMirror: {backendRef: {name: mirror-2, port: 8080}}}
    backendRefs: [{name: infra-backend-v1, port: 8080}]
  - matches: [{path: {value: /multi-mirror-and-modify-request-headers}}]
    filters:
    - {type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: X-Header-Set, value: set-overwrites-values}]}}
    - {type: RequestMirror, requestMirror: {backendRef: {name: mirror-1, port: 8080}}}
    - {type: RequestMirror, requestMirror: {backendRef: {name: mirror-2, port: 8080}}}
    backendRefs: [{name: infra-backend-v1, port: 8080}]"#,
    );
    let (_gw, st) = start(vec![same_namespace(port), static_service("mirror-1", INFRA, 8080, &[m1]), static_service("mirror-2", INFRA, 8080, &[m2]), r]).await;
    accepted_and_resolved(&st, "infra/request-multiple-mirrors");
    for path in ["/multi-mirror", "/multi-mirror-and-modify-request-headers"] {
        let r = req(port, "GET", "x", path, &[("X-Header-Set", "original")]).await;
        expect_backend(&r, "infra-backend-v1", path);
        if path.ends_with("headers") {
            assert_eq!(r.echo().header("x-header-set"), Some("set-overwrites-values"));
        }
        for rx in [&mut rx1, &mut rx2] {
            let got = tokio::time::timeout(Duration::from_secs(20), rx.recv()).await.expect("each mirror gets a copy").unwrap();
            assert_eq!(got, path);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn httproute_named_rule() {
    let port = free_port();
    let r = infra_route(
        "named-rule",
        "  - name: named-rule\n    matches: [{path: {value: /named}}]\n    backendRefs: [{name: infra-backend-v1, port: 8080}]\n  - matches: [{path: {value: /unnamed}}]\n    backendRefs: [{name: infra-backend-v2, port: 8080}]",
    );
    let (_gw, st) = start(vec![same_namespace(port), r]).await;
    accepted_and_resolved(&st, "infra/named-rule");
    expect_all(port, &[("x", "/named", NO_HEADERS, Ok("infra-backend-v1")), ("x", "/unnamed", NO_HEADERS, Ok("infra-backend-v2"))]).await;
}

/// GatewayHTTPListenerIsolation (a Gateway case about HTTPRoute routing): a request is routed
/// only by the routes of the most specific listener whose hostname matches it, never by the
/// routes of a less specific listener on the same port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_http_listener_isolation() {
    let port = free_port();
    let l = |name: &str, host: Option<&str>| match host {
        Some(h) => format!("{{name: {name}, port: {port}, protocol: HTTP, hostname: \"{h}\"}}"),
        None => format!("{{name: {name}, port: {port}, protocol: HTTP}}"),
    };
    let gw = gateway_doc(
        "http-listener-isolation",
        &[l("empty-hostname", None), l("wildcard-example-com", Some("*.example.com")), l("wildcard-foo-example-com", Some("*.foo.example.com")), l("abc-foo-example-com", Some("abc.foo.example.com"))],
    );
    let r = |section: &str, backend: &str| {
        route(
            &format!("attaches-to-{section}"),
            INFRA,
            &format!("  parentRefs: [{{name: http-listener-isolation, sectionName: {section}}}]\n  rules:\n  - matches: [{{path: {{value: /{section}}}}}]\n    backendRefs: [{{name: {backend}, port: 8080}}]"),
        )
    };
    let (_gw, st) = start(vec![
        gw,
        r("empty-hostname", "infra-backend-v1"),
        r("wildcard-example-com", "infra-backend-v2"),
        r("wildcard-foo-example-com", "infra-backend-v3"),
        r("abc-foo-example-com", "app-backend-v1").replace("name: app-backend-v1", "name: app-backend-v1, namespace: app"),
        grant("to-app", "app", "HTTPRoute", INFRA, None),
    ])
    .await;
    for s in ["empty-hostname", "wildcard-example-com", "wildcard-foo-example-com", "abc-foo-example-com"] {
        accepted_and_resolved(&st, &format!("infra/attaches-to-{s}"));
    }
    let mut cases: Vec<Case> = vec![];
    for (host, own, backend) in [
        ("bar.com", "/empty-hostname", "infra-backend-v1"),
        ("bar.example.com", "/wildcard-example-com", "infra-backend-v2"),
        ("bar.foo.example.com", "/wildcard-foo-example-com", "infra-backend-v3"),
        ("abc.foo.example.com", "/abc-foo-example-com", "app-backend-v1"),
    ] {
        cases.push((host, own, NO_HEADERS, Ok(backend)));
        for other in ["/empty-hostname", "/wildcard-example-com", "/wildcard-foo-example-com", "/abc-foo-example-com"] {
            if other != own {
                cases.push((host, other, NO_HEADERS, Err(404)));
            }
        }
    }
    expect_all(port, &cases).await;
}

/// HTTPRouteHTTPSListenerDetectMisdirectedRequests: on a port with several HTTPS listeners, a
/// request whose Host selects another listener than the TLS SNI did (HTTP/2 connection
/// coalescing, or a client sending a Host for another certificate) is answered 421 Misdirected
/// Request instead of being routed by the other listener's routes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn httproute_https_listener_detect_misdirected_requests() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let port = free_port();
    let secret = tls_secret("tls-validity-checks-certificate", &["example.org", "second-example.org", "*.wildcard.org", "unknown-example.org"]);
    let l = |name: &str, host: Option<&str>| {
        let h = host.map(|h| format!("hostname: \"{h}\", ")).unwrap_or_default();
        format!("{{name: {name}, port: {port}, protocol: HTTPS, {h}tls: {{certificateRefs: [{{name: tls-validity-checks-certificate}}]}}, allowedRoutes: {{namespaces: {{from: Same}}}}}}")
    };
    let gw = gateway_doc(
        "same-namespace-with-https-listener",
        &[
            l("https", None),
            l("https-with-hostname", Some("second-example.org")),
            l("https-with-wildcard-hostname", Some("*.wildcard.org")),
            l("https-with-hostname-matching-wildcard", Some("fourth-example.wildcard.org")),
        ],
    );
    let r = |n: u8, section: Option<&str>, hosts: &str, backend: &str| {
        let parent = match section {
            Some(s) => format!("{{name: same-namespace-with-https-listener, sectionName: {s}}}"),
            None => "{name: same-namespace-with-https-listener}".to_string(),
        };
        route(
            &format!("misdirected-{n}"),
            INFRA,
            &format!("  parentRefs: [{parent}]\n  hostnames: {hosts}\n  rules:\n  - matches: [{{path: {{value: /detect-misdirected-requests}}}}]\n    backendRefs: [{{name: {backend}, port: 8080}}]"),
        )
    };
    let (_gw, st) = start(vec![
        gw,
        secret,
        r(1, None, "[example.org]", "infra-backend-v1"),
        r(2, Some("https-with-hostname"), "[]", "infra-backend-v2"),
        r(3, Some("https-with-wildcard-hostname"), "[third-example.wildcard.org, fifth-example.wildcard.org]", "infra-backend-v3"),
        r(4, Some("https-with-hostname-matching-wildcard"), "[third-example.wildcard.org, fourth-example.wildcard.org]", "app-backend-v1").replace("name: app-backend-v1", "name: app-backend-v1, namespace: app"),
        grant("to-app", "app", "HTTPRoute", INFRA, None),
    ])
    .await;
    for n in 1..=4 {
        accepted_and_resolved(&st, &format!("infra/misdirected-{n}"));
    }
    let cases: &[(&str, &str, Result<&str, u16>)] = &[
        ("example.org", "example.org", Ok("infra-backend-v1")),
        ("example.org", "second-example.org", Err(421)),
        ("example.org", "unknown-example.org", Err(404)),
        ("second-example.org", "second-example.org", Ok("infra-backend-v2")),
        ("second-example.org", "example.org", Err(421)),
        ("second-example.org", "unknown-example.org", Err(421)),
        ("third-example.wildcard.org", "third-example.wildcard.org", Ok("infra-backend-v3")),
        ("third-example.wildcard.org", "fifth-example.wildcard.org", Ok("infra-backend-v3")),
        ("third-example.wildcard.org", "fourth-example.wildcard.org", Err(421)),
        ("third-example.wildcard.org", "second-example.org", Err(421)),
        ("third-example.wildcard.org", "unknown-example.org", Err(421)),
        ("fourth-example.wildcard.org", "fourth-example.wildcard.org", Ok("app-backend-v1")),
        ("fourth-example.wildcard.org", "fifth-example.wildcard.org", Err(421)),
        ("unknown-example.org", "example.org", Ok("infra-backend-v1")),
        ("unknown-example.org", "unknown-example.org", Err(404)),
        // the port in Host does not matter
        ("second-example.org", "second-example.org:443", Ok("infra-backend-v2")),
    ];
    for (sni, host, want) in cases {
        let r = tls_get(port, sni, host, "/detect-misdirected-requests").await;
        let what = format!("SNI {sni}, Host {host}");
        match want {
            Ok(b) => expect_backend(&r, b, &what),
            Err(code) => assert_eq!(r.status, *code, "{what}: {:?}", String::from_utf8_lossy(&r.body)),
        }
    }
    // HTTP/2 connection coalescing: one connection (SNI example.org), requests for two hosts
    let statuses = h2_tls_statuses(port, "example.org", &["example.org", "second-example.org", "example.org"], "/detect-misdirected-requests").await;
    assert_eq!(statuses, [200, 421, 200]);
}

/// Over one HTTP/2 TLS connection (SNI `sni`, ALPN h2), GET `path` with each `:authority`.
async fn h2_tls_statuses(port: u16, sni: &str, authorities: &[&str], path: &str) -> Vec<u16> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(rustls::pki_types::ServerName::try_from(sni.to_string()).unwrap(), tcp)
        .await
        .expect("TLS handshake");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut s, conn) = hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(tls)).await.unwrap();
    tokio::spawn(conn);
    let mut out = vec![];
    for a in authorities {
        let req = http::Request::builder().uri(format!("https://{a}{path}")).body(empty()).unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(20), s.send_request(req)).await.expect("answer in time").unwrap();
        out.push(resp.status().as_u16());
        let _ = resp.into_body().collect().await;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn httproute_https_listener() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let port = free_port();
    let secret = tls_secret("tls-validity-checks-certificate", &["example.org", "second-example.org", "unknown-example.org"]);
    let gw = gateway_doc(
        "same-namespace-with-https-listener",
        &[
            format!("{{name: https, port: {port}, protocol: HTTPS, tls: {{certificateRefs: [{{name: tls-validity-checks-certificate}}]}}}}"),
            format!("{{name: https-with-hostname, port: {port}, protocol: HTTPS, hostname: second-example.org, tls: {{certificateRefs: [{{name: tls-validity-checks-certificate}}]}}}}"),
        ],
    );
    let with_host = route("httproute-https-test", INFRA, "  parentRefs: [{name: same-namespace-with-https-listener}]\n  hostnames: [example.org]\n  rules:\n  - backendRefs: [{name: infra-backend-v1, port: 8080}]");
    let no_host = route(
        "httproute-https-test-no-hostname",
        INFRA,
        "  parentRefs: [{name: same-namespace-with-https-listener, sectionName: https-with-hostname}]\n  rules:\n  - backendRefs: [{name: infra-backend-v2, port: 8080}]",
    );
    let (_gw, st) = start(vec![gw, secret, with_host, no_host]).await;
    accepted_and_resolved(&st, "infra/httproute-https-test");
    accepted_and_resolved(&st, "infra/httproute-https-test-no-hostname");
    let r = tls_get(port, "example.org", "example.org", "/").await;
    expect_backend(&r, "infra-backend-v1", "example.org");
    assert_eq!(r.echo().header("x-forwarded-proto"), Some("https"));
    assert_eq!(tls_get(port, "unknown-example.org", "unknown-example.org", "/").await.status, 404);
    expect_backend(&tls_get(port, "second-example.org", "second-example.org", "/").await, "infra-backend-v2", "second-example.org");
}
