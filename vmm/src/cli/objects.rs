//! `--object` (QEMU's -object) for what migration uses: `tls-creds-x509`, `authz-simple`
//! and `authz-list`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use migration::transport::tls::{self, Authz, AuthzRule, Endpoint, TlsCreds};

/// Splits QEMU option text at single commas; `,,` stands for a literal comma.
fn split_options(text: &str) -> Vec<String> {
    let mut parts = vec![String::new()];
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                if let Some(p) = parts.last_mut() {
                    p.push(',');
                }
            } else {
                parts.push(String::new());
            }
        } else if let Some(p) = parts.last_mut() {
            p.push(c);
        }
    }
    parts
}

fn options(text: &str) -> Result<(String, BTreeMap<String, String>), String> {
    let mut parts = split_options(text).into_iter();
    let kind = parts.next().unwrap_or_default();
    let mut map = BTreeMap::new();
    for p in parts {
        let (k, v) = p
            .split_once('=')
            .ok_or_else(|| format!("--object {kind}: '{p}' is not KEY=VALUE"))?;
        if map.insert(k.to_string(), v.to_string()).is_some() {
            return Err(format!("--object {kind}: '{k}' given twice"));
        }
    }
    Ok((kind, map))
}

fn on_off(kind: &str, key: &str, v: &str) -> Result<bool, String> {
    match v {
        "on" | "yes" | "true" => Ok(true),
        "off" | "no" | "false" => Ok(false),
        _ => Err(format!(
            "--object {kind}: Parameter '{key}' expects 'on' or 'off'"
        )),
    }
}

/// Parses one `--object` and registers it for migrations to find by id.
pub fn add_object(text: &str) -> Result<(), String> {
    let (kind, mut o) = options(text)?;
    let id = o
        .remove("id")
        .ok_or_else(|| format!("--object {kind}: Parameter 'id' is missing"))?;
    match kind.as_str() {
        "tls-creds-x509" => {
            let dir = PathBuf::from(
                o.remove("dir")
                    .ok_or_else(|| format!("--object {kind}: Parameter 'dir' is missing"))?,
            );
            let endpoint = match o.remove("endpoint").as_deref() {
                Some("server") => Endpoint::Server,
                Some("client") | None => Endpoint::Client,
                Some(other) => {
                    return Err(format!(
                        "--object {kind}: Parameter 'endpoint' does not accept value '{other}'"
                    ))
                }
            };
            let verify_peer = match o.remove("verify-peer") {
                Some(v) => on_off(&kind, "verify-peer", &v)?,
                None => true,
            };
            if endpoint == Endpoint::Client && !verify_peer {
                return Err(format!(
                    "--object {kind}: verify-peer=off is not supported on the client side (Ferry always checks the server's certificate)"
                ));
            }
            if let Some(k) = o.keys().next() {
                return Err(format!("--object {kind}: Parameter '{k}' is unexpected"));
            }
            let creds = TlsCreds::load(&id, &dir, endpoint, verify_peer).map_err(|e| e.to_string())?;
            tls::register_creds(creds);
        }
        "authz-simple" => {
            let identity = o
                .remove("identity")
                .ok_or_else(|| format!("--object {kind}: Parameter 'identity' is missing"))?;
            if let Some(k) = o.keys().next() {
                return Err(format!("--object {kind}: Parameter '{k}' is unexpected"));
            }
            tls::register_authz(Authz::simple(&id, &identity));
        }
        "authz-list" => {
            let default_allow = match o.remove("policy").as_deref() {
                None | Some("deny") => false,
                Some("allow") => true,
                Some(v) => {
                    return Err(format!(
                        "--object {kind}: Parameter 'policy' does not accept value '{v}'"
                    ))
                }
            };
            let mut rules: BTreeMap<usize, AuthzRule> = BTreeMap::new();
            for (k, v) in o {
                let rest = k
                    .strip_prefix("rules.")
                    .ok_or_else(|| format!("--object {kind}: Parameter '{k}' is unexpected"))?;
                let (n, field) = rest
                    .split_once('.')
                    .ok_or_else(|| format!("--object {kind}: Parameter '{k}' is unexpected"))?;
                let n: usize = n
                    .parse()
                    .map_err(|_| format!("--object {kind}: Parameter '{k}' is unexpected"))?;
                let r = rules.entry(n).or_insert(AuthzRule {
                    pattern: String::new(),
                    allow: true,
                    glob: false,
                });
                match field {
                    "match" => r.pattern = v,
                    "policy" => r.allow = v == "allow",
                    "format" => r.glob = v == "glob",
                    _ => return Err(format!("--object {kind}: Parameter '{k}' is unexpected")),
                }
            }
            tls::register_authz(Authz {
                id,
                rules: rules.into_values().collect(),
                default_allow,
            });
        }
        other => {
            return Err(format!(
                "--object: Ferry has no object type '{other}' (tls-creds-x509, authz-simple and authz-list exist)"
            ))
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn double_commas_are_literal_commas() {
        assert_eq!(
            split_options("authz-simple,id=a,identity=CN=x,,O=Example Org"),
            ["authz-simple", "id=a", "identity=CN=x,O=Example Org"]
        );
    }

    #[test]
    fn authz_objects_register() {
        add_object("authz-simple,id=a1,identity=CN=x").unwrap();
        assert!(tls::lookup_authz("a1").unwrap().is_allowed("CN=x"));
        add_object("authz-list,id=a2,policy=deny,rules.0.match=CN=*.ok,rules.0.policy=allow,rules.0.format=glob")
            .unwrap();
        let a = tls::lookup_authz("a2").unwrap();
        assert!(a.is_allowed("CN=host.ok"));
        assert!(!a.is_allowed("CN=host.bad"));
    }

    #[test]
    fn bad_objects_are_refused() {
        assert!(add_object("tls-creds-x509,dir=/x")
            .unwrap_err()
            .contains("'id' is missing"));
        assert!(
            add_object("tls-creds-x509,id=t,dir=/nonexistent,endpoint=server")
                .unwrap_err()
                .contains("ca-cert.pem")
        );
        assert!(add_object("tls-creds-x509,id=t,dir=/x,endpoint=middle").is_err());
        assert!(add_object("memory-backend-ram,id=m").is_err());
        assert!(add_object("authz-simple,id=z").is_err());
        assert!(add_object("authz-list,id=z,rules.0.colour=red").is_err());
    }
}
