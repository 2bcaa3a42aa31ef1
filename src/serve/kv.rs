//! A request's own KV budget and policy (`kv_budget`, `kv_policy`, edgemoe's extra fields on
//! JSON lines and HTTP alike): parsed strictly, merged with the server's flags, and checked
//! against what `--mem` reserved per request.

use super::protocol::FieldError;
use crate::engine::Engine;
use crate::kv::{plan::bytes_per_token_maps, Budget, KvDemand, KvOptions, Policy};
use serde_json::{Map, Value};

/// What a request asked for; absent fields take the server's.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RequestKv {
    pub budget: Option<Budget>,
    pub policy: Option<Policy>,
}

/// `kv_budget`: a number of tokens (`512`) or a string (`"512"`, `"25%"` of the tokens the
/// request reaches); `kv_policy`: `"full"`, `"window"`, `"h2o"` or `"lazy"`.
pub fn parse(obj: &Map<String, Value>) -> Result<RequestKv, FieldError> {
    let budget = match obj.get("kv_budget") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => match n.as_u64() {
            Some(t) if t > 0 => Some(Budget::Tokens(usize::try_from(t).unwrap_or(usize::MAX))),
            _ => {
                return Err((
                    "invalid_value",
                    format!("`kv_budget` must be a positive number of tokens or \"PCT%\", got {n}"),
                ))
            }
        },
        Some(Value::String(s)) => Some(
            s.parse::<Budget>()
                .map_err(|e| ("invalid_value", format!("`kv_budget`: {e}")))?,
        ),
        Some(_) => {
            return Err((
                "invalid_type",
                "`kv_budget` must be a number of tokens or a string like \"25%\"".into(),
            ))
        }
    };
    let policy = match obj.get("kv_policy") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(
            s.parse::<Policy>()
                .map_err(|e| ("invalid_value", format!("`kv_policy`: {e}")))?,
        ),
        Some(_) => {
            return Err((
                "invalid_type",
                "`kv_policy` must be a string (full, window, h2o, lazy)".into(),
            ))
        }
    };
    Ok(RequestKv { budget, policy })
}

/// The options a request of `reach` tokens runs with: its own fields over the server's (a
/// budget without a policy means lazy, as on the command line; `full` drops the budget). With
/// `--mem`, a request whose cache would outgrow what the server reserved per request is refused.
pub fn options(engine: &Engine, req: RequestKv, reach: usize) -> Result<KvOptions, FieldError> {
    let server = *engine.kv_options();
    let opts = if req == RequestKv::default() {
        server
    } else {
        let budget = match (req.budget, req.policy) {
            (Some(b), _) => Some(b),
            (None, Some(Policy::Full)) => None,
            (None, _) => server.budget,
        };
        let policy = match (req.policy, budget, server.policy) {
            (Some(p), _, _) => p,
            (None, Some(_), Policy::Full) => Policy::Lazy,
            (None, Some(_), p) => p,
            (None, None, _) => Policy::Full,
        };
        KvOptions {
            policy,
            budget,
            ..server
        }
    };
    let invalid = |m: String| ("invalid_value", m);
    match (opts.policy, opts.budget) {
        (Policy::Full, Some(_)) => {
            return Err(invalid(
                "`kv_policy` full keeps every token: it takes no `kv_budget`".into(),
            ))
        }
        (Policy::Window | Policy::H2o | Policy::Lazy, None) => {
            return Err(invalid(format!(
                "`kv_policy` {} needs a `kv_budget` (the server has none)",
                opts.policy
            )))
        }
        _ => {}
    }
    opts.resolve(reach).map_err(|e| invalid(e.to_string()))?;
    if let Some(plan) = engine.experts.plan() {
        let cfg = &engine.model().config;
        let demand = KvDemand {
            options: opts,
            reach,
            sequences: 1,
        };
        let tokens = demand
            .tokens_per_sequence(cfg.max_position_embeddings)
            .map_err(|e| invalid(e.to_string()))?;
        let maps = opts.position_maps(cfg.cache_kv_heads());
        let bytes = tokens as u64
            * bytes_per_token_maps(cfg.num_layers, cfg.kv_layout(), maps, opts.policy);
        let reserved = plan.fixed.kv.tokens_per_sequence as u64 * plan.fixed.kv.bytes_per_token;
        if bytes > reserved {
            return Err((
                "kv_budget_too_large",
                format!(
                    "this request's KV cache would hold {tokens} tokens ({bytes} bytes); --mem \
                     reserved {reserved} bytes per request ({} tokens): ask for a smaller `kv_budget`",
                    plan.fixed.kv.tokens_per_sequence
                ),
            ));
        }
    }
    Ok(opts)
}

/// A running request's KV cache for the stats: its policy and budget (tokens), the slots its
/// fullest layer holds, the bytes it allocated and the evictions it has run.
pub fn sequence(gen: &crate::engine::generation::Generation) -> Value {
    let cfg = gen.cache.eviction_config();
    serde_json::json!({
        "policy": cfg.map_or("full".to_string(), |c| c.policy.to_string()),
        "budget": cfg.map(|c| c.budget),
        "slots": gen.cache.len_tokens(),
        "allocated_bytes": gen.cache.allocated_bytes(),
        "evictions": gen.cache.eviction().map_or(0, |e| e.evictions),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::protocol::{parse_request, Api};
    use std::sync::Arc;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn both_http_apis_take_the_fields_strictly() {
        let chat = obj(
            serde_json::json!({"messages": [{"role": "user", "content": "hi"}],
            "kv_budget": "25%", "kv_policy": "window"}),
        );
        let r = parse_request(&chat, Api::Chat).unwrap();
        assert_eq!(
            r.kv,
            RequestKv {
                budget: Some(Budget::Percent(25.0)),
                policy: Some(Policy::Window)
            }
        );
        let done = obj(serde_json::json!({"prompt": "hi", "kv_budget": 300}));
        let r = parse_request(&done, Api::Completions).unwrap();
        assert_eq!(r.kv.budget, Some(Budget::Tokens(300)));
        for (bad, code) in [
            (
                serde_json::json!({"prompt": "hi", "kv_budget": 0}),
                "invalid_value",
            ),
            (
                serde_json::json!({"prompt": "hi", "kv_budget": 1.5}),
                "invalid_value",
            ),
            (
                serde_json::json!({"prompt": "hi", "kv_budget": "0%"}),
                "invalid_value",
            ),
            (
                serde_json::json!({"prompt": "hi", "kv_budget": [1]}),
                "invalid_type",
            ),
            (
                serde_json::json!({"prompt": "hi", "kv_policy": "LRU"}),
                "invalid_value",
            ),
            (
                serde_json::json!({"prompt": "hi", "kv_polcy": "lazy"}),
                "unknown_field",
            ),
        ] {
            let e = parse_request(&obj(bad.clone()), Api::Completions).unwrap_err();
            assert_eq!(e.0, code, "{bad}: {}", e.1);
        }
    }

    #[test]
    fn request_fields_override_the_servers() {
        let mut engine = Engine::new(Arc::new(crate::model::Model::builtin_default()), 1).unwrap();
        let none = RequestKv::default();
        assert_eq!(options(&engine, none, 300).unwrap(), KvOptions::default());
        let budget = RequestKv {
            budget: Some(Budget::Tokens(200)),
            policy: None,
        };
        // A budget alone means lazy, as on the command line.
        let o = options(&engine, budget, 300).unwrap();
        assert_eq!(
            (o.policy, o.budget),
            (Policy::Lazy, Some(Budget::Tokens(200)))
        );
        engine
            .set_kv_options(KvOptions {
                policy: Policy::H2o,
                budget: Some(Budget::Percent(50.0)),
                ..KvOptions::default()
            })
            .unwrap();
        // The server's policy stays with a request's budget; `full` drops the server's budget.
        assert_eq!(options(&engine, budget, 300).unwrap().policy, Policy::H2o);
        let full = RequestKv {
            budget: None,
            policy: Some(Policy::Full),
        };
        assert_eq!(options(&engine, full, 300).unwrap(), KvOptions::default());
        // 50% of 200 tokens is below the sinks and two windows.
        assert!(options(&engine, none, 200)
            .unwrap_err()
            .1
            .contains("too small"));
    }
}
