//! The `block-bitmap-mapping` parameter: its QAPI types and QEMU's validity check
//! (`check_dirty_bitmap_mig_alias_map` in `migration/block-dirty-bitmap.c`).
//!
//! Ferry migrates no block devices, but the parameter is part of QEMU's
//! interface: it is accepted, checked with QEMU's rules and texts, stored and
//! reported back by `query-migrate-parameters`.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::qapi::{Args, QapiError};

/// Longest block node name QEMU accepts (`sizeof(BlockDriverState.node_name) - 1`).
pub const MAX_NODE_NAME_LEN: usize = 31;
/// Longest dirty bitmap name (`BDRV_BITMAP_MAX_NAME_SIZE`).
pub const MAX_BITMAP_NAME_LEN: usize = 1023;
/// Longest node or bitmap alias (`UINT8_MAX`: it travels with a one-byte length).
pub const MAX_ALIAS_LEN: usize = 255;

/// `BitmapMigrationBitmapAliasTransform`: how a bitmap changes in flight.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BitmapAliasTransform {
    /// Make the bitmap persistent (or transient) on the destination.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent: Option<bool>,
}

/// `BitmapMigrationBitmapAlias`: one bitmap of a node and its alias.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BitmapAlias {
    /// The bitmap's name.
    pub name: String,
    /// The name it travels under.
    pub alias: String,
    /// Optional changes applied on the way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transform: Option<BitmapAliasTransform>,
}

/// `BitmapMigrationNodeAlias`: a block node, its alias, and its bitmaps' aliases.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeAlias {
    /// The block node name.
    #[serde(rename = "node-name")]
    pub node_name: String,
    /// The name it travels under.
    pub alias: String,
    /// Mappings of the node's bitmaps.
    pub bitmaps: Vec<BitmapAlias>,
}

impl NodeAlias {
    /// Reads one `BitmapMigrationNodeAlias` the way QEMU's input visitor does.
    pub fn visit(args: &mut Args<'_>) -> Result<Self, QapiError> {
        let node_name = args.req_str("node-name")?;
        let alias = args.req_str("alias")?;
        let bitmaps = args.req_list("bitmaps", |b| {
            let name = b.req_str("name")?;
            let alias = b.req_str("alias")?;
            let transform = b.opt_object("transform", |t| {
                Ok(BitmapAliasTransform {
                    persistent: t.opt_bool("persistent")?,
                })
            })?;
            Ok(BitmapAlias {
                name,
                alias,
                transform,
            })
        })?;
        Ok(NodeAlias {
            node_name,
            alias,
            bitmaps,
        })
    }
}

/// QEMU's `id_wellformed()`: a letter, then letters, digits, `-`, `.` or `_`.
pub fn id_wellformed(id: &str) -> bool {
    let mut chars = id.chars();
    match chars.next() {
        Some(c) if c.is_ascii_alphabetic() => {}
        _ => return false,
    }
    chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

/// Checks a mapping in both directions as QEMU does; the error is QEMU's text
/// (without the "Invalid mapping given for block-bitmap-mapping: " prefix).
pub fn check_mapping(mapping: &[NodeAlias]) -> Result<(), String> {
    check_direction(mapping, true)?;
    check_direction(mapping, false)
}

/// One pass of QEMU's `construct_alias_map()`: names to aliases, or aliases to names.
fn check_direction(mapping: &[NodeAlias], name_to_alias: bool) -> Result<(), String> {
    let mut nodes: HashMap<&str, HashSet<&str>> = HashMap::new();
    for node in mapping {
        if !id_wellformed(&node.alias) {
            return Err(format!(
                "The node alias '{}' is not well-formed",
                node.alias
            ));
        }
        if node.alias.len() > MAX_ALIAS_LEN {
            return Err(format!(
                "The node alias '{}' is longer than {} bytes",
                node.alias, MAX_ALIAS_LEN
            ));
        }
        if node.node_name.len() > MAX_NODE_NAME_LEN {
            return Err(format!(
                "The node name '{}' is longer than {} bytes",
                node.node_name, MAX_NODE_NAME_LEN
            ));
        }
        let key = if name_to_alias {
            if nodes.contains_key(node.node_name.as_str()) {
                return Err(format!(
                    "The node name '{}' is mapped twice",
                    node.node_name
                ));
            }
            node.node_name.as_str()
        } else {
            if nodes.contains_key(node.alias.as_str()) {
                return Err(format!("The node alias '{}' is used twice", node.alias));
            }
            node.alias.as_str()
        };
        let bitmaps = nodes.entry(key).or_default();
        for bitmap in &node.bitmaps {
            if bitmap.alias.len() > MAX_ALIAS_LEN {
                return Err(format!(
                    "The bitmap alias '{}' is longer than {} bytes",
                    bitmap.alias, MAX_ALIAS_LEN
                ));
            }
            if bitmap.name.len() > MAX_BITMAP_NAME_LEN {
                return Err(format!(
                    "The bitmap name '{}' is longer than {} bytes",
                    bitmap.name, MAX_BITMAP_NAME_LEN
                ));
            }
            let from = if name_to_alias {
                if bitmaps.contains(bitmap.name.as_str()) {
                    return Err(format!(
                        "The bitmap '{}'/'{}' is mapped twice",
                        node.node_name, bitmap.name
                    ));
                }
                bitmap.name.as_str()
            } else {
                if bitmaps.contains(bitmap.alias.as_str()) {
                    return Err(format!(
                        "The bitmap alias '{}'/'{}' is used twice",
                        node.alias, bitmap.alias
                    ));
                }
                bitmap.alias.as_str()
            };
            bitmaps.insert(from);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, alias: &str, bitmaps: &[(&str, &str)]) -> NodeAlias {
        NodeAlias {
            node_name: name.into(),
            alias: alias.into(),
            bitmaps: bitmaps
                .iter()
                .map(|(n, a)| BitmapAlias {
                    name: (*n).into(),
                    alias: (*a).into(),
                    transform: None,
                })
                .collect(),
        }
    }

    #[test]
    fn id_wellformed_follows_qemu() {
        assert!(id_wellformed("a"));
        assert!(id_wellformed("node0.x-y_z"));
        assert!(!id_wellformed(""));
        assert!(!id_wellformed("0abc"));
        assert!(!id_wellformed("#block123"));
        assert!(!id_wellformed("a b"));
    }

    #[test]
    fn valid_mapping_passes() {
        let m = vec![
            node("drive0", "d0", &[("bm0", "b0"), ("bm1", "b1")]),
            node("drive1", "d1", &[("bm0", "b0")]),
        ];
        assert_eq!(check_mapping(&m), Ok(()));
        assert_eq!(check_mapping(&[]), Ok(()));
    }

    #[test]
    fn node_alias_must_be_well_formed() {
        let m = vec![node("drive0", "-x", &[])];
        assert_eq!(
            check_mapping(&m).unwrap_err(),
            "The node alias '-x' is not well-formed"
        );
    }

    #[test]
    fn length_limits_are_qemus() {
        let long_alias = format!("a{}", "b".repeat(255));
        let m = vec![node("n", &long_alias, &[])];
        assert_eq!(
            check_mapping(&m).unwrap_err(),
            format!("The node alias '{long_alias}' is longer than 255 bytes")
        );
        let ok_alias = format!("a{}", "b".repeat(254));
        assert_eq!(check_mapping(&[node("n", &ok_alias, &[])]), Ok(()));

        let long_node = "n".repeat(32);
        assert_eq!(
            check_mapping(&[node(&long_node, "a", &[])]).unwrap_err(),
            format!("The node name '{long_node}' is longer than 31 bytes")
        );
        assert_eq!(check_mapping(&[node(&"n".repeat(31), "a", &[])]), Ok(()));

        let long_bitmap_alias = "x".repeat(256);
        assert_eq!(
            check_mapping(&[node("n", "a", &[("b", &long_bitmap_alias)])]).unwrap_err(),
            format!("The bitmap alias '{long_bitmap_alias}' is longer than 255 bytes")
        );
        let long_bitmap = "y".repeat(1024);
        assert_eq!(
            check_mapping(&[node("n", "a", &[(&long_bitmap, "b")])]).unwrap_err(),
            format!("The bitmap name '{long_bitmap}' is longer than 1023 bytes")
        );
    }

    #[test]
    fn duplicates_are_refused_in_both_directions() {
        let m = vec![node("n", "a", &[]), node("n", "b", &[])];
        assert_eq!(
            check_mapping(&m).unwrap_err(),
            "The node name 'n' is mapped twice"
        );
        let m = vec![node("n", "a", &[]), node("m", "a", &[])];
        assert_eq!(
            check_mapping(&m).unwrap_err(),
            "The node alias 'a' is used twice"
        );
        let m = vec![node("n", "a", &[("b", "x"), ("b", "y")])];
        assert_eq!(
            check_mapping(&m).unwrap_err(),
            "The bitmap 'n'/'b' is mapped twice"
        );
        let m = vec![node("n", "a", &[("b", "x"), ("c", "x")])];
        assert_eq!(
            check_mapping(&m).unwrap_err(),
            "The bitmap alias 'a'/'x' is used twice"
        );
    }

    #[test]
    fn visit_reads_all_members_and_refuses_extras() {
        let v = serde_json::json!({"m": [{"node-name": "n", "alias": "a",
            "bitmaps": [{"name": "b", "alias": "x", "transform": {"persistent": true}}]}]});
        let map = v.as_object().unwrap();
        let mut args = Args::new(map);
        let m = args.req_list("m", NodeAlias::visit).unwrap();
        assert_eq!(
            m[0].bitmaps[0].transform.as_ref().unwrap().persistent,
            Some(true)
        );

        let v = serde_json::json!({"m": [{"node-name": "n", "alias": "a",
            "bitmaps": [{"name": "b", "alias": "x", "extra": 1}]}]});
        let err = Args::new(v.as_object().unwrap())
            .req_list("m", NodeAlias::visit)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "Parameter 'm[0].bitmaps[0].extra' is unexpected"
        );
    }
}
