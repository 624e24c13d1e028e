use super::*;
use crate::config::ObjectSet;
use crate::resolver::StaticResolver;

const BASE: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {name: fjord}
spec: {controllerName: fjord.dev/gateway}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: gw, namespace: default}
spec:
  gatewayClassName: fjord
  listeners:
  - {name: http, port: 8000, protocol: HTTP, allowedRoutes: {namespaces: {from: All}}}
---
apiVersion: fjord.dev/v1alpha1
kind: StaticService
metadata: {name: a, namespace: default}
spec: {ports: [{port: 80, endpoints: ["127.0.0.1:1"]}]}
---
apiVersion: fjord.dev/v1alpha1
kind: StaticService
metadata: {name: b, namespace: default}
spec: {ports: [{port: 80, endpoints: ["127.0.0.1:2"]}]}
---
apiVersion: fjord.dev/v1alpha1
kind: StaticService
metadata: {name: c, namespace: other}
spec: {ports: [{port: 80, endpoints: ["127.0.0.1:3"]}]}
"#;

fn build_yaml(extra: &str) -> BuildOutput {
    let objs = ObjectSet::from_yaml("test", &format!("{BASE}\n---\n{extra}")).expect("parses");
    let r = StaticResolver::new(&objs.static_services);
    build(&objs, &r)
}

/// Which route/rule a request hits: `ns/name#rule`, or None.
fn hit(out: &BuildOutput, method: &str, host: &str, path_q: &str, headers: &[(&str, &str)]) -> Option<String> {
    let (path, q) = path_q.split_once('?').unwrap_or((path_q, ""));
    let query = parse_query(q);
    let mut h = http::HeaderMap::new();
    for (k, v) in headers {
        h.append(HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
    }
    let m = Method::from_bytes(method.as_bytes()).unwrap();
    let pt = out.table.ports.get(&8000)?;
    let l = pt.listener_for(host)?;
    let v = RequestView { host, path, method: &m, headers: &h, query: &query };
    l.find(&v).map(|e| format!("{}#{}", e.rule.route, e.rule.index))
}

fn route(name: &str, ts: &str, hostnames: &str, rules: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}, namespace: default, creationTimestamp: \"{ts}\"}}\nspec:\n  parentRefs: [{{name: gw}}]\n  hostnames: {hostnames}\n  rules:\n{rules}\n"
    )
}

fn cond<'a>(out: &'a BuildOutput, route: &str, t: &str) -> &'a Condition {
    let st = out.status.http_routes.get(route).unwrap_or_else(|| panic!("no status for {route}"));
    find_condition(&st.parents[0].conditions, t).unwrap_or_else(|| panic!("no {t} on {route}: {st:?}"))
}

#[test]
fn path_precedence_exact_regex_prefix_length() {
    let r = route(
        "r",
        "2024-01-01T00:00:00Z",
        "[]",
        r#"  - matches: [{path: {type: PathPrefix, value: /}}]
    backendRefs: [{name: a, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /api}}]
    backendRefs: [{name: a, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /api/v1}}]
    backendRefs: [{name: a, port: 80}]
  - matches: [{path: {type: Exact, value: /api/v1/exact}}]
    backendRefs: [{name: a, port: 80}]
  - matches: [{path: {type: RegularExpression, value: "/api/v1/re[0-9]+"}}]
    backendRefs: [{name: a, port: 80}]"#,
    );
    let out = build_yaml(&r);
    assert_eq!(hit(&out, "GET", "x", "/", &[]).as_deref(), Some("default/r#0"));
    assert_eq!(hit(&out, "GET", "x", "/apix", &[]).as_deref(), Some("default/r#0"), "prefix is segment-wise");
    assert_eq!(hit(&out, "GET", "x", "/api", &[]).as_deref(), Some("default/r#1"));
    assert_eq!(hit(&out, "GET", "x", "/api/x", &[]).as_deref(), Some("default/r#1"));
    assert_eq!(hit(&out, "GET", "x", "/api/v1/x", &[]).as_deref(), Some("default/r#2"), "longer prefix first");
    assert_eq!(hit(&out, "GET", "x", "/api/v1/exact", &[]).as_deref(), Some("default/r#3"), "exact first");
    assert_eq!(hit(&out, "GET", "x", "/api/v1/exact/", &[]).as_deref(), Some("default/r#2"));
    assert_eq!(hit(&out, "GET", "x", "/api/v1/re42", &[]).as_deref(), Some("default/r#4"), "regex over prefix");
    assert_eq!(hit(&out, "GET", "x", "/api/v1/re42x", &[]).as_deref(), Some("default/r#2"), "regex is anchored");
}

#[test]
fn method_headers_query_precedence_and_route_ties() {
    let r1 = route(
        "zeta",
        "2024-01-01T00:00:00Z",
        "[]",
        r#"  - matches: [{path: {value: /p}}]
    backendRefs: [{name: a, port: 80}]
  - matches: [{path: {value: /p}, method: POST}]
    backendRefs: [{name: a, port: 80}]
  - matches: [{path: {value: /p}, headers: [{name: X-A, value: "1"}]}]
    backendRefs: [{name: a, port: 80}]
  - matches: [{path: {value: /p}, headers: [{name: x-a, value: "1"}, {name: x-b, type: RegularExpression, value: "b+"}]}]
    backendRefs: [{name: a, port: 80}]
  - matches: [{path: {value: /p}, queryParams: [{name: q, value: "1"}]}]
    backendRefs: [{name: a, port: 80}]"#,
    );
    // same match as zeta#0 on /t: older route wins; alpha is newer
    let r2 = route(
        "alpha",
        "2024-02-01T00:00:00Z",
        "[]",
        "  - matches: [{path: {value: /t}}]\n    backendRefs: [{name: a, port: 80}]",
    );
    let r3 = route(
        "omega",
        "2024-01-01T00:00:00Z",
        "[]",
        "  - matches: [{path: {value: /t}}]\n    backendRefs: [{name: a, port: 80}]\n  - matches: [{path: {value: /u}}]\n    backendRefs: [{name: a, port: 80}]",
    );
    let r4 = route(
        "beta",
        "2024-01-01T00:00:00Z",
        "[]",
        "  - matches: [{path: {value: /u}}]\n    backendRefs: [{name: a, port: 80}]",
    );
    let out = build_yaml(&format!("{r1}---\n{r2}---\n{r3}---\n{r4}"));
    assert_eq!(hit(&out, "GET", "x", "/p", &[]).as_deref(), Some("default/zeta#0"));
    assert_eq!(hit(&out, "POST", "x", "/p", &[("x-a", "1"), ("x-b", "bb")]).as_deref(), Some("default/zeta#1"), "method beats headers");
    assert_eq!(hit(&out, "GET", "x", "/p", &[("x-a", "1")]).as_deref(), Some("default/zeta#2"));
    assert_eq!(hit(&out, "GET", "x", "/p", &[("x-a", "1"), ("x-b", "bbb")]).as_deref(), Some("default/zeta#3"), "most headers");
    assert_eq!(hit(&out, "GET", "x", "/p", &[("x-a", "1"), ("x-b", "bc")]).as_deref(), Some("default/zeta#2"), "regex anchored");
    assert_eq!(hit(&out, "GET", "x", "/p", &[("x-a", "2")]).as_deref(), Some("default/zeta#0"), "exact value");
    assert_eq!(hit(&out, "GET", "x", "/p?q=1", &[("x-a", "1")]).as_deref(), Some("default/zeta#2"), "headers beat query");
    assert_eq!(hit(&out, "GET", "x", "/p?q=1", &[]).as_deref(), Some("default/zeta#4"));
    assert_eq!(hit(&out, "GET", "x", "/p?Q=1", &[]).as_deref(), Some("default/zeta#0"), "query names are case-sensitive");
    assert_eq!(hit(&out, "GET", "x", "/t", &[]).as_deref(), Some("default/omega#0"), "oldest route, then alphabetical: beta<omega but both older than alpha");
    assert_eq!(hit(&out, "GET", "x", "/u", &[]).as_deref(), Some("default/beta#0"), "same age: alphabetical");
}

#[test]
fn hostname_precedence_and_listener_intersection() {
    let extra = r#"apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: gw2, namespace: default}
spec:
  gatewayClassName: fjord
  listeners:
  - {name: wild, port: 8000, protocol: HTTP, hostname: "*.example.com"}
"#;
    // gw2 listener on the same port with a hostname: allowed (different hostname than gw's none)
    let any = route("any", "2024-01-01T00:00:00Z", "[]", "  - backendRefs: [{name: a, port: 80}]");
    let wild = route("wild", "2024-01-01T00:00:00Z", "[\"*.example.com\"]", "  - matches: [{path: {value: /w}}]\n    backendRefs: [{name: a, port: 80}]")
        .replace("[{name: gw}]", "[{name: gw2}]");
    let exact = route("exact", "2024-01-01T00:00:00Z", "[\"foo.example.com\"]", "  - matches: [{path: {value: /w}}]\n    backendRefs: [{name: a, port: 80}]")
        .replace("[{name: gw}]", "[{name: gw2}]");
    let nomatch = route("nomatch", "2024-01-01T00:00:00Z", "[\"foo.other.org\"]", "  - backendRefs: [{name: a, port: 80}]")
        .replace("[{name: gw}]", "[{name: gw2}]");
    let out = build_yaml(&format!("{extra}---\n{any}---\n{wild}---\n{exact}---\n{nomatch}"));
    assert_eq!(hit(&out, "GET", "foo.example.com", "/w/x", &[]).as_deref(), Some("default/exact#0"));
    assert_eq!(hit(&out, "GET", "bar.example.com", "/w/x", &[]).as_deref(), Some("default/wild#0"));
    assert_eq!(hit(&out, "GET", "a.b.example.com", "/w", &[]).as_deref(), Some("default/wild#0"));
    // the *.example.com listener takes these hosts; no route there for /other
    assert_eq!(hit(&out, "GET", "bar.example.com", "/other", &[]), None);
    // example.com is not covered by the wildcard listener → the hostname-less listener of gw
    assert_eq!(hit(&out, "GET", "example.com", "/w", &[]).as_deref(), Some("default/any#0"));
    let c = cond(&out, "default/nomatch", "Accepted");
    assert!(!c.is_true());
    assert_eq!(c.reason, "NoMatchingListenerHostname");
    assert_eq!(out.status.gateways["default/gw2"].listeners[0].attached_routes, 2);
}

#[test]
fn weights_schedule_is_exact_and_zero_weights_give_500() {
    let r = route(
        "w",
        "",
        "[]",
        r#"  - matches: [{path: {value: /s}}]
    backendRefs: [{name: a, port: 80, weight: 90}, {name: b, port: 80, weight: 10}]
  - matches: [{path: {value: /z}}]
    backendRefs: [{name: a, port: 80, weight: 0}, {name: b, port: 80}]
  - matches: [{path: {value: /allzero}}]
    backendRefs: [{name: a, port: 80, weight: 0}, {name: b, port: 80, weight: 0}]
  - matches: [{path: {value: /none}}]"#,
    );
    let out = build_yaml(&r);
    let l = &out.table.ports[&8000].listeners[0];
    let find = |p: &str| {
        let m = Method::GET;
        let h = http::HeaderMap::new();
        l.find(&RequestView { host: "x", path: p, method: &m, headers: &h, query: &[] }).unwrap().rule.clone()
    };
    let rule = find("/s");
    let mut counts = HashMap::new();
    for _ in 0..1000 {
        match rule.backends.pick().unwrap().as_ref() {
            BackendChoice::Ready(b) => *counts.entry(b.name.to_string()).or_insert(0) += 1,
            o => panic!("{o:?}"),
        }
    }
    assert_eq!(counts["default/a:80"], 900);
    assert_eq!(counts["default/b:80"], 100);
    let rule = find("/z");
    for _ in 0..10 {
        match rule.backends.pick().unwrap().as_ref() {
            BackendChoice::Ready(b) => assert_eq!(&*b.name, "default/b:80"),
            o => panic!("{o:?}"),
        }
    }
    assert!(find("/allzero").backends.pick().is_none());
    assert!(find("/none").backends.pick().is_none());
    // large weights use weighted random
    let big = BackendSet::new(vec![
        (600_000, Arc::new(BackendChoice::Fail { name: "x".into(), status: StatusCode::OK })),
        (400_000, Arc::new(BackendChoice::Fail { name: "y".into(), status: StatusCode::OK })),
    ]);
    let mut x = 0;
    for _ in 0..10_000 {
        if let BackendChoice::Fail { name, .. } = big.pick().unwrap().as_ref() {
            if &**name == "x" {
                x += 1;
            }
        }
    }
    assert!((5500..6500).contains(&x), "{x}");
}

#[test]
fn bad_input_is_refused_per_object_with_reasons() {
    let good = route("good", "", "[]", "  - matches: [{path: {value: /good}}]\n    backendRefs: [{name: a, port: 80}]");
    let bad_re = route("badre", "", "[]", "  - matches: [{path: {type: RegularExpression, value: \"/x(\"}}]\n    backendRefs: [{name: a, port: 80}]");
    let bad_filter = route("badfilter", "", "[]", "  - matches: [{path: {value: /bf}}]\n    filters: [{type: Frobnicate}]\n    backendRefs: [{name: a, port: 80}]");
    let partial = route(
        "partial",
        "",
        "[]",
        "  - matches: [{path: {value: /p-ok}}]\n    backendRefs: [{name: a, port: 80}]\n  - matches: [{path: {value: /p-bad}, headers: [{name: x, type: RegularExpression, value: \"[\"}]}]\n    backendRefs: [{name: a, port: 80}]",
    );
    let xns = route("xns", "", "[]", "  - matches: [{path: {value: /xns}}]\n    backendRefs: [{name: c, namespace: other, port: 80}]");
    let missing = route(
        "missing",
        "",
        "[]",
        "  - matches: [{path: {value: /m}}]\n    backendRefs: [{name: nope, port: 80}, {name: a, port: 81}]",
    );
    let out = build_yaml(&[good, bad_re, bad_filter, partial, xns, missing].join("---\n"));
    let c = cond(&out, "default/badre", "Accepted");
    assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", "UnsupportedValue"));
    assert!(c.message.contains("spec.rules[0].matches[0].path.value") && c.message.contains("regular expression"), "{}", c.message);
    let c = cond(&out, "default/badfilter", "Accepted");
    assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", "UnsupportedValue"));
    assert!(c.message.contains("filters[0].type") && c.message.contains("Frobnicate"), "{}", c.message);
    let c = cond(&out, "default/partial", "PartiallyInvalid");
    assert!(c.is_true() && c.message.contains("rules[1]"), "{c:?}");
    assert!(cond(&out, "default/partial", "Accepted").is_true());
    let c = cond(&out, "default/xns", "ResolvedRefs");
    assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", "RefNotPermitted"));
    let c = cond(&out, "default/missing", "ResolvedRefs");
    assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", "BackendNotFound"));
    // nothing else disturbed
    assert_eq!(hit(&out, "GET", "x", "/good", &[]).as_deref(), Some("default/good#0"));
    assert_eq!(hit(&out, "GET", "x", "/p-ok", &[]).as_deref(), Some("default/partial#0"));
    assert_eq!(hit(&out, "GET", "x", "/p-bad", &[]), None);
    assert_eq!(hit(&out, "GET", "x", "/bf", &[]), None);
    assert!(cond(&out, "default/good", "Accepted").is_true());
    assert!(cond(&out, "default/good", "ResolvedRefs").is_true());

    // with a ReferenceGrant the cross-namespace ref resolves
    let grant = "apiVersion: gateway.networking.k8s.io/v1beta1\nkind: ReferenceGrant\nmetadata: {name: g, namespace: other}\nspec:\n  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: default}]\n  to: [{group: \"\", kind: Service}]\n";
    let xns = route("xns", "", "[]", "  - matches: [{path: {value: /xns}}]\n    backendRefs: [{name: c, namespace: other, port: 80}]");
    let out = build_yaml(&format!("{xns}---\n{grant}"));
    assert!(cond(&out, "default/xns", "ResolvedRefs").is_true());
}

#[test]
fn conflicting_listeners_keep_the_older_one() {
    let extra = r#"apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: newer, namespace: default, creationTimestamp: "2030-01-01T00:00:00Z"}
spec:
  gatewayClassName: fjord
  listeners:
  - {name: same-port-https, port: 8000, protocol: HTTPS, tls: {certificateRefs: [{name: nothere}]}}
  - {name: same-host, port: 8000, protocol: HTTP}
  - {name: fine, port: 8001, protocol: HTTP}
  - {name: tcp, port: 8002, protocol: TCP}
  - {name: nocert, port: 8003, protocol: HTTPS, tls: {certificateRefs: [{name: nothere}]}}
"#;
    let out = build_yaml(extra);
    let g = &out.status.gateways["default/newer"];
    let l = |n: &str| g.listeners.iter().find(|l| l.name == n).unwrap();
    let c = find_condition(&l("same-host").conditions, "Conflicted").unwrap();
    assert_eq!((c.status.as_str(), c.reason.as_str()), ("True", "HostnameConflict"));
    let c = find_condition(&l("tcp").conditions, "Accepted").unwrap();
    assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", "UnsupportedProtocol"));
    let c = find_condition(&l("nocert").conditions, "ResolvedRefs").unwrap();
    assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", "InvalidCertificateRef"));
    assert!(find_condition(&l("fine").conditions, "Programmed").unwrap().is_true());
    let acc = find_condition(&g.conditions, "Accepted").unwrap();
    assert_eq!((acc.status.as_str(), acc.reason.as_str()), ("True", "ListenersNotValid"));
    // the older gateway's listener is untouched
    let old = &out.status.gateways["default/gw"];
    assert!(find_condition(&old.listeners[0].conditions, "Programmed").unwrap().is_true());
    assert_eq!(out.table.ports[&8000].listeners.len(), 1);
    assert!(out.table.ports.contains_key(&8001));
    assert!(!out.table.ports.contains_key(&8002));
    assert!(!out.table.ports.contains_key(&8003));
}

#[test]
fn allowed_routes_and_parent_refs() {
    let extra = r#"apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: same, namespace: default}
spec:
  gatewayClassName: fjord
  listeners:
  - {name: l1, port: 8001, protocol: HTTP}
"#;
    let other_ns = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r, namespace: other}\nspec:\n  parentRefs: [{name: same, namespace: default}]\n  rules: [{backendRefs: [{name: c, port: 80}]}]\n";
    let bad_section = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: s, namespace: default}\nspec:\n  parentRefs: [{name: same, sectionName: nope}]\n  rules: [{backendRefs: [{name: a, port: 80}]}]\n";
    let not_ours = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: n, namespace: default}\nspec:\n  parentRefs: [{name: somebody-else}]\n";
    let out = build_yaml(&format!("{extra}---\n{other_ns}---\n{bad_section}---\n{not_ours}"));
    assert_eq!(cond(&out, "other/r", "Accepted").reason, "NotAllowedByListeners");
    assert_eq!(cond(&out, "default/s", "Accepted").reason, "NoMatchingParent");
    assert!(!out.status.http_routes.contains_key("default/n"), "no status for parents that are not ours");
}

#[test]
fn filters_compile_and_validate() {
    let r = route(
        "f",
        "",
        "[]",
        r#"  - matches: [{path: {value: /a}}]
    filters:
    - type: RequestRedirect
      requestRedirect: {scheme: https, statusCode: 418}
  - matches: [{path: {type: Exact, value: /b}}]
    filters:
    - type: URLRewrite
      urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /x}}
    backendRefs: [{name: a, port: 80}]
  - matches: [{path: {value: /c}}]
    filters:
    - {type: URLRewrite, urlRewrite: {hostname: x.example}}
    - {type: RequestRedirect, requestRedirect: {hostname: y.example}}
  - matches: [{path: {value: /d}}]
    timeouts: {request: 1s, backendRequest: 2s}
    backendRefs: [{name: a, port: 80}]
  - matches: [{path: {value: /e}}]
    timeouts: {request: 1x}
    backendRefs: [{name: a, port: 80}]"#,
    );
    let out = build_yaml(&r);
    let c = cond(&out, "default/f", "Accepted");
    assert_eq!(c.reason, "UnsupportedValue");
    for needle in ["statusCode", "ReplacePrefixMatch needs a PathPrefix", "cannot be used in the same rule", "backendRequest must not exceed", "timeouts.request"] {
        assert!(c.message.contains(needle), "{needle} not in {}", c.message);
    }
}

#[test]
fn allowed_routes_namespace_selector_uses_namespace_labels() {
    let extra = r#"apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: sel, namespace: default}
spec:
  gatewayClassName: fjord
  listeners:
  - name: l
    port: 8005
    protocol: HTTP
    allowedRoutes:
      namespaces:
        from: Selector
        selector:
          matchLabels: {team: web}
          matchExpressions: [{key: env, operator: NotIn, values: [prod]}]
  - name: byname
    port: 8006
    protocol: HTTP
    allowedRoutes: {namespaces: {from: Selector, selector: {matchExpressions: [{key: kubernetes.io/metadata.name, operator: In, values: [blue]}]}}}
  - name: bad
    port: 8007
    protocol: HTTP
    allowedRoutes: {namespaces: {from: Selector, selector: {matchExpressions: [{key: a, operator: Near}]}}}
---
apiVersion: v1
kind: Namespace
metadata: {name: web1, labels: {team: web}}
---
apiVersion: v1
kind: Namespace
metadata: {name: web2, labels: {team: web, env: prod}}
"#;
    let r = |ns: &str, section: &str| {
        format!("apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: r, namespace: {ns}}}\nspec:\n  parentRefs: [{{name: sel, namespace: default, sectionName: {section}}}]\n  rules: [{{backendRefs: [{{name: a, namespace: default, port: 80}}]}}]\n")
    };
    let out = build_yaml(&format!("{extra}---\n{}---\n{}---\n{}---\n{}", r("web1", "l"), r("web2", "l"), r("blue", "byname"), r("other", "l")));
    assert!(cond(&out, "web1/r", "Accepted").is_true());
    assert_eq!(cond(&out, "web2/r", "Accepted").reason, "NotAllowedByListeners");
    assert!(cond(&out, "blue/r", "Accepted").is_true());
    assert_eq!(cond(&out, "other/r", "Accepted").reason, "NotAllowedByListeners");
    let bad = &out.status.gateways["default/sel"].listeners[2];
    let c = find_condition(&bad.conditions, "Accepted").unwrap();
    assert!(!c.is_true() && c.message.contains("Near"), "{c:?}");
}
