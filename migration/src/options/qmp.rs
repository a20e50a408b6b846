//! The QMP forms of the options: `query-migrate-capabilities`,
//! `query-migrate-parameters`, `migrate-set-capabilities` and
//! `migrate-set-parameters`, as QEMU 8.1 reads and prints them.
//!
//! ```text
//! -> { "execute": "migrate-set-capabilities",
//!      "arguments": { "capabilities": [ { "capability": "xbzrle", "state": true } ] } }
//! <- { "return": {} }
//! -> { "execute": "query-migrate-capabilities" }
//! <- { "return": [ { "capability": "xbzrle", "state": true }, ... ] }   (no "block")
//! -> { "execute": "migrate-set-parameters", "arguments": { "max-bandwidth": 1073741824 } }
//! <- { "return": {} }
//! -> { "execute": "query-migrate-parameters" }
//! <- { "return": { "announce-initial": 50, ..., "multifd-zstd-level": 1 } }
//! ```

use serde_json::{Map, Value};

use super::capabilities::{Capabilities, Capability, CapabilityStatus};
use super::check::HostSupport;
use super::error::OptionsError;
use super::parameters::{Parameters, ParametersUpdate};
use super::store::MigrationOptions;
use crate::qapi::{Args, QapiError};

/// `query-migrate-capabilities`: every capability with its state, in QEMU's
/// order, without `block` (QEMU omits it when built without block migration,
/// and Ferry has none).
pub fn query_capabilities(caps: &Capabilities) -> Vec<CapabilityStatus> {
    caps.iter()
        .filter(|(c, _)| *c != Capability::Block)
        .map(|(capability, state)| CapabilityStatus { capability, state })
        .collect()
}

/// The JSON `return` value of `query-migrate-capabilities`.
pub fn query_capabilities_json(caps: &Capabilities) -> Value {
    Value::Array(
        query_capabilities(caps)
            .into_iter()
            .map(|s| {
                let mut m = Map::new();
                m.insert(
                    "capability".into(),
                    Value::String(s.capability.name().into()),
                );
                m.insert("state".into(), Value::Bool(s.state));
                Value::Object(m)
            })
            .collect(),
    )
}

/// The JSON `return` value of `query-migrate-parameters`.
///
/// Serializing [`Parameters`] directly (`serde_json::to_string`) keeps
/// QEMU's member order; a `Value` orders members as `serde_json::Map` does.
pub fn query_parameters_json(params: &Parameters) -> Value {
    serde_json::to_value(params).unwrap_or(Value::Null)
}

/// Reads `migrate-set-capabilities` arguments (`{"capabilities": [...]}`) with QEMU's texts.
pub fn parse_set_capabilities(
    arguments: &Map<String, Value>,
) -> Result<Vec<CapabilityStatus>, QapiError> {
    let mut args = Args::new(arguments);
    let list = args.req_list("capabilities", |element| {
        let capability = element.req_enum("capability", Capability::from_name)?;
        let state = element.req_bool("state")?;
        Ok(CapabilityStatus { capability, state })
    })?;
    args.finish()?;
    Ok(list)
}

/// Builds `migrate-set-capabilities` arguments.
pub fn set_capabilities_arguments(changes: &[CapabilityStatus]) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert(
        "capabilities".into(),
        serde_json::to_value(changes).unwrap_or(Value::Array(Vec::new())),
    );
    m
}

/// Runs `migrate-set-capabilities` on `store`.
pub fn migrate_set_capabilities(
    store: &MigrationOptions,
    arguments: &Map<String, Value>,
    host: &dyn HostSupport,
) -> Result<(), OptionsError> {
    let changes = parse_set_capabilities(arguments)?;
    store.set_capabilities(&changes, host)
}

/// Runs `migrate-set-parameters` on `store`.
pub fn migrate_set_parameters(
    store: &MigrationOptions,
    arguments: &Map<String, Value>,
) -> Result<(), OptionsError> {
    let update = ParametersUpdate::from_qmp(arguments)?;
    store.set_parameters(&update)
}

#[cfg(test)]
mod tests {
    use super::super::bitmap_mapping::{BitmapAlias, BitmapAliasTransform, NodeAlias};
    use super::super::check::FixedHostSupport;
    use super::super::parameters::MultiFdCompression;
    use super::*;
    use crate::qapi::StrOrNull;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => panic!("not an object"),
        }
    }

    #[test]
    fn query_capabilities_lists_all_but_block_in_qemu_order() {
        let caps: Capabilities = [Capability::Events, Capability::Block]
            .into_iter()
            .collect();
        let v = query_capabilities_json(&caps);
        let list = v.as_array().unwrap();
        assert_eq!(list.len(), 21);
        assert_eq!(list[0], json!({"capability": "xbzrle", "state": false}));
        assert_eq!(list[5], json!({"capability": "events", "state": true}));
        assert!(list.iter().all(|e| e["capability"] != "block"));
        assert_eq!(
            list[20],
            json!({"capability": "switchover-ack", "state": false})
        );
    }

    #[test]
    fn query_capabilities_output_parses_back() {
        let caps: Capabilities = [Capability::Multifd, Capability::ReturnPath]
            .into_iter()
            .collect();
        let text = serde_json::to_string(&query_capabilities(&caps)).unwrap();
        assert!(text.starts_with(r#"[{"capability":"xbzrle","state":false},"#));
        let back: Vec<CapabilityStatus> = serde_json::from_str(&text).unwrap();
        assert_eq!(Capabilities::new().with_changes(&back), caps);
        // The same list is valid migrate-set-capabilities input.
        let args = set_capabilities_arguments(&back);
        assert_eq!(parse_set_capabilities(&args).unwrap(), back);
    }

    #[test]
    fn query_parameters_prints_qemu_member_order_and_defaults() {
        let text = serde_json::to_string(&Parameters::default()).unwrap();
        assert_eq!(
            text,
            concat!(
                r#"{"announce-initial":50,"announce-max":550,"announce-rounds":5,"announce-step":100,"#,
                r#""compress-level":1,"compress-threads":8,"compress-wait-thread":true,"decompress-threads":2,"#,
                r#""throttle-trigger-threshold":50,"cpu-throttle-initial":20,"cpu-throttle-increment":10,"#,
                r#""cpu-throttle-tailslow":false,"tls-creds":"","tls-hostname":"","tls-authz":"","#,
                r#""max-bandwidth":134217728,"downtime-limit":300,"x-checkpoint-delay":20000,"#,
                r#""block-incremental":false,"multifd-channels":2,"xbzrle-cache-size":67108864,"#,
                r#""max-postcopy-bandwidth":0,"max-cpu-throttle":99,"multifd-compression":"none","#,
                r#""multifd-zlib-level":1,"multifd-zstd-level":1}"#
            )
        );
    }

    fn full_parameters() -> Parameters {
        Parameters {
            announce_initial: 1,
            announce_max: 2,
            announce_rounds: 3,
            announce_step: 4,
            compress_level: 5,
            compress_threads: 6,
            compress_wait_thread: false,
            decompress_threads: 7,
            throttle_trigger_threshold: 8,
            cpu_throttle_initial: 9,
            cpu_throttle_increment: 10,
            cpu_throttle_tailslow: true,
            tls_creds: "creds".into(),
            tls_hostname: "host".into(),
            tls_authz: "authz".into(),
            max_bandwidth: 11,
            downtime_limit: 12,
            x_checkpoint_delay: 13,
            block_incremental: true,
            multifd_channels: 14,
            xbzrle_cache_size: 1 << 20,
            max_postcopy_bandwidth: 15,
            max_cpu_throttle: 16,
            multifd_compression: MultiFdCompression::Zstd,
            multifd_zlib_level: 2,
            multifd_zstd_level: 3,
            block_bitmap_mapping: Some(vec![NodeAlias {
                node_name: "node0".into(),
                alias: "n0".into(),
                bitmaps: vec![BitmapAlias {
                    name: "bm".into(),
                    alias: "b".into(),
                    transform: Some(BitmapAliasTransform {
                        persistent: Some(true),
                    }),
                }],
            }]),
        }
    }

    #[test]
    fn query_parameters_output_parses_back() {
        for p in [Parameters::default(), full_parameters()] {
            let text = serde_json::to_string(&p).unwrap();
            let back: Parameters = serde_json::from_str(&text).unwrap();
            assert_eq!(back, p);
            assert_eq!(
                serde_json::from_value::<Parameters>(query_parameters_json(&p)).unwrap(),
                p
            );
        }
    }

    #[test]
    fn block_bitmap_mapping_appears_only_once_set() {
        assert!(query_parameters_json(&Parameters::default())
            .get("block-bitmap-mapping")
            .is_none());
        let v = query_parameters_json(&full_parameters());
        assert_eq!(
            v["block-bitmap-mapping"],
            json!([{"node-name": "node0", "alias": "n0",
                    "bitmaps": [{"name": "bm", "alias": "b", "transform": {"persistent": true}}]}])
        );
    }

    #[test]
    fn set_parameters_input_with_every_member_round_trips_through_the_store() {
        let p = full_parameters();
        let args = ParametersUpdate::from_parameters(&p).to_qmp();
        assert_eq!(args.len(), 27);
        let store = MigrationOptions::new();
        migrate_set_parameters(&store, &args).unwrap();
        assert_eq!(*store.params(), p);
        // What query prints is what set accepted.
        let queried = query_parameters_json(&store.params());
        assert_eq!(Value::Object(args), queried);
    }

    #[test]
    fn set_parameters_null_tls_means_empty() {
        let store = MigrationOptions::new();
        migrate_set_parameters(
            &store,
            &obj(json!({"tls-creds": "c", "tls-hostname": "h", "tls-authz": "a"})),
        )
        .unwrap();
        migrate_set_parameters(
            &store,
            &obj(json!({"tls-creds": null, "tls-hostname": null, "tls-authz": null})),
        )
        .unwrap();
        let p = store.params();
        assert_eq!(
            (
                p.tls_creds.as_str(),
                p.tls_hostname.as_str(),
                p.tls_authz.as_str()
            ),
            ("", "", "")
        );
        let u = ParametersUpdate::from_qmp(&obj(json!({"tls-creds": null}))).unwrap();
        assert_eq!(u.tls_creds, Some(StrOrNull::Null));
        assert_eq!(u.to_qmp(), obj(json!({"tls-creds": null})));
    }

    #[test]
    fn set_parameters_visitor_error_changes_nothing() {
        let store = MigrationOptions::new();
        let err = migrate_set_parameters(
            &store,
            &obj(json!({"max-bandwidth": 1, "compress-level": 256})),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "Parameter 'compress-level' expects uint8_t"
        );
        assert_eq!(*store.params(), Parameters::default());
    }

    #[test]
    fn set_capabilities_visitor_errors() {
        let cases = [
            (json!({}), "Parameter 'capabilities' is missing"),
            (
                json!({"capabilities": {}}),
                "Invalid parameter type for 'capabilities', expected: array",
            ),
            (
                json!({"capabilities": [1]}),
                "Invalid parameter type for 'capabilities[0]', expected: object",
            ),
            (
                json!({"capabilities": [{"state": true}]}),
                "Parameter 'capabilities[0].capability' is missing",
            ),
            (
                json!({"capabilities": [{"capability": "xbzrle"}]}),
                "Parameter 'capabilities[0].state' is missing",
            ),
            (
                json!({"capabilities": [{"capability": "dirty-limit", "state": true}]}),
                "Parameter 'capability' does not accept value 'dirty-limit'",
            ),
            (
                json!({"capabilities": [{"capability": "xbzrle", "state": "on"}]}),
                "Invalid parameter type for 'capabilities[0].state', expected: boolean",
            ),
            (
                json!({"capabilities": [{"capability": "xbzrle", "state": true, "x": 1}]}),
                "Parameter 'capabilities[0].x' is unexpected",
            ),
            (
                json!({"capabilities": [], "y": 1}),
                "Parameter 'y' is unexpected",
            ),
        ];
        for (args, text) in cases {
            let err = parse_set_capabilities(&obj(args.clone())).unwrap_err();
            assert_eq!(err.to_string(), text, "for {args}");
        }
    }

    #[test]
    fn set_capabilities_through_qmp_applies_and_refuses_like_qemu() {
        let store = MigrationOptions::new();
        let host = FixedHostSupport::capable();
        migrate_set_capabilities(
            &store,
            &obj(json!({"capabilities": [{"capability": "xbzrle", "state": true}]})),
            &host,
        )
        .unwrap();
        assert!(store.caps().get(Capability::Xbzrle));
        let err = migrate_set_capabilities(
            &store,
            &obj(json!({"capabilities": [{"capability": "block", "state": true}]})),
            &host,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "QEMU compiled without old-style (blk/-b, inc/-i) block migration"
        );
        assert!(!store.caps().get(Capability::Block));
    }
}
