//! Legacy key names: the training notebooks' module names (`tok`, `pos`, `norm`,
//! `blocks.N.norm1` / `norm2` / `asa`) and wrapper prefixes (`module.` from DDP, `_orig_mod.` from
//! `torch.compile`) mapped to the library's names (`token_emb`, `pos_emb`, `ln_f`,
//! `blocks.N.ln_1` / `ln_2` / `attn`).

use std::collections::BTreeMap;

use super::st::AnyTensor;

/// Strips wrapper prefixes (`module.`, `_orig_mod.`, in any order and number).
fn strip_wrappers(mut k: &str) -> &str {
    loop {
        if let Some(r) = k.strip_prefix("module.") {
            k = r;
        } else if let Some(r) = k.strip_prefix("_orig_mod.") {
            k = r;
        } else {
            return k;
        }
    }
}

/// Maps one key to the library's name (returns it unchanged when it already is one).
pub fn normalize_key(key: &str) -> String {
    let k = strip_wrappers(key);
    for (old, new) in [
        ("tok.", "token_emb."),
        ("pos.", "pos_emb."),
        ("norm.", "ln_f."),
    ] {
        if let Some(rest) = k.strip_prefix(old) {
            return format!("{new}{rest}");
        }
    }
    if let Some(rest) = k.strip_prefix("blocks.") {
        if let Some((n, tail)) = rest.split_once('.') {
            if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) {
                // `blocks.N.<module>` may itself carry wrapper prefixes (compiled blocks)
                let tail = strip_wrappers(tail);
                for (old, new) in [("norm1.", "ln_1."), ("norm2.", "ln_2."), ("asa.", "attn.")] {
                    if let Some(r) = tail.strip_prefix(old) {
                        return format!("blocks.{n}.{new}{r}");
                    }
                }
                return format!("blocks.{n}.{tail}");
            }
        }
    }
    k.to_string()
}

/// Normalises key names to the library's (see the module docs). Library names pass through
/// unchanged. Returns the new map and whether any key was renamed.
///
/// If a renamed key would collide with a key the file already has under that name (both `tok.weight`
/// and `token_emb.weight`), the legacy key is kept as is, so that a strict load reports it as
/// unexpected rather than one silently shadowing the other.
pub fn normalize_keys(map: BTreeMap<String, AnyTensor>) -> (BTreeMap<String, AnyTensor>, bool) {
    let renamed: Vec<(String, String)> = map
        .keys()
        .filter_map(|k| {
            let n = normalize_key(k);
            (n != *k).then(|| (k.clone(), n))
        })
        .collect();
    if renamed.is_empty() {
        return (map, false);
    }
    let mut map = map;
    let mut out = BTreeMap::new();
    let mut any = false;
    // Keys that keep their name first, so collisions are detected against them.
    let moving: std::collections::HashSet<&String> = renamed.iter().map(|(o, _)| o).collect();
    let staying: Vec<String> = map
        .keys()
        .filter(|k| !moving.contains(k))
        .cloned()
        .collect();
    for k in staying {
        if let Some(v) = map.remove(&k) {
            out.insert(k, v);
        }
    }
    for (old, new) in &renamed {
        if let Some(v) = map.remove(old) {
            if out.contains_key(new) {
                out.insert(old.clone(), v);
            } else {
                out.insert(new.clone(), v);
                any = true;
            }
        }
    }
    (out, any)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t() -> AnyTensor {
        AnyTensor::from_f32(vec![1], vec![0.0])
    }

    #[test]
    fn maps_legacy_names() {
        for (old, new) in [
            ("tok.weight", "token_emb.weight"),
            ("pos.weight", "pos_emb.weight"),
            ("norm.weight", "ln_f.weight"),
            ("norm.bias", "ln_f.bias"),
            ("blocks.0.norm1.weight", "blocks.0.ln_1.weight"),
            ("blocks.12.norm2.bias", "blocks.12.ln_2.bias"),
            ("blocks.3.asa.slot_keys", "blocks.3.attn.slot_keys"),
            (
                "blocks.3.asa._slotspace_gate_raw",
                "blocks.3.attn._slotspace_gate_raw",
            ),
            ("module.tok.weight", "token_emb.weight"),
            (
                "_orig_mod.blocks.1.asa.Wk_write.weight",
                "blocks.1.attn.Wk_write.weight",
            ),
            ("module._orig_mod.norm.bias", "ln_f.bias"),
            // library names unchanged
            ("token_emb.weight", "token_emb.weight"),
            ("blocks.0.ln_1.weight", "blocks.0.ln_1.weight"),
            ("blocks.0.attn.slot_keys", "blocks.0.attn.slot_keys"),
            ("blocks.0.mlp.0.weight", "blocks.0.mlp.0.weight"),
            ("lm_head.weight", "lm_head.weight"),
            ("ln_f.weight", "ln_f.weight"),
            // not a block index: untouched
            ("blocks.x.norm1.weight", "blocks.x.norm1.weight"),
            // `norm` inside a block's submodule is not the top-level norm
            ("blocks.0.attn.norm.weight", "blocks.0.attn.norm.weight"),
        ] {
            assert_eq!(normalize_key(old), new, "{old}");
        }
    }

    #[test]
    fn reports_legacy_and_keeps_collisions() {
        let m: BTreeMap<String, AnyTensor> = [
            ("token_emb.weight".to_string(), t()),
            ("ln_f.weight".to_string(), t()),
        ]
        .into_iter()
        .collect();
        let (out, legacy) = normalize_keys(m.clone());
        assert!(!legacy);
        assert_eq!(out, m);
        let m: BTreeMap<String, AnyTensor> = [
            ("tok.weight".to_string(), t()),
            ("norm.weight".to_string(), t()),
        ]
        .into_iter()
        .collect();
        let (out, legacy) = normalize_keys(m);
        assert!(legacy);
        assert!(out.contains_key("token_emb.weight") && out.contains_key("ln_f.weight"));
        let m: BTreeMap<String, AnyTensor> = [
            ("tok.weight".to_string(), t()),
            ("token_emb.weight".to_string(), t()),
        ]
        .into_iter()
        .collect();
        let (out, _) = normalize_keys(m);
        assert!(out.contains_key("tok.weight") && out.contains_key("token_emb.weight"));
    }
}
