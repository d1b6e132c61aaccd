//! What the CLI-level training tests share: the binary, tiny prepared data, the tiny run config
//! and folder copies.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

pub fn asa() -> Command {
    Command::new(env!("CARGO_BIN_EXE_asa"))
}

/// `asa prepare` of the Sonnets into `<dir>/data-<tokenizer>` (5% held out for validation).
pub fn prepare_with(dir: &Path, tokenizer: &str) -> PathBuf {
    let data = dir.join(format!("data-{tokenizer}"));
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/corpus/sonnets.txt");
    let out = asa()
        .args([
            "prepare",
            "--tokenizer",
            tokenizer,
            "--val-frac",
            "0.05",
            "--outdir",
        ])
        .arg(&data)
        .arg(src)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    data
}

/// The tiny run's model and training keys: dropouts on (so the generators' positions matter),
/// gradient accumulation, evaluated and saved every 3 steps.
pub const TINY_RUN_KEYS: &str = "vocab_size = 256
max_seq_len = 16
embed_dim = 32
num_layers = 2
num_heads = 2
num_slots = 4
slotspace_dim = 8
write_chunk_size = 8
dropout = 0.1
slot_dropout = 0.05
slotspace_dropout = 0.05
batch_size = 2
grad_accum_steps = 2
learning_rate = 3e-3
warmup_steps = 5
total_steps = 40
eval_interval = 3
val_windows = 8
";

/// Writes `<dir>/<name>.toml`: the tiny run on `data`, saved under `<dir>/runs/<name>`. The
/// lines of `extra` replace the base's lines of the same key.
pub fn write_config(dir: &Path, data: &Path, name: &str, extra: &str) -> PathBuf {
    let p = dir.join(format!("{name}.toml"));
    let base = format!(
        "data = \"{}\"\noutdir = \"{}\"\nname = \"{name}\"\n{TINY_RUN_KEYS}",
        data.display(),
        dir.join("runs").display()
    );
    let key = |l: &str| l.split('=').next().unwrap_or("").trim().to_string();
    let keys: Vec<String> = extra.lines().map(key).collect();
    let mut text: String = base
        .lines()
        .filter(|l| !keys.contains(&key(l)))
        .map(|l| format!("{l}\n"))
        .collect();
    text.push_str(extra);
    text.push('\n');
    std::fs::write(&p, text).unwrap();
    p
}

/// Copies a folder tree.
pub fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap().flatten() {
        let p = e.path();
        let d = dst.join(e.file_name());
        if p.is_dir() {
            copy_dir(&p, &d);
        } else {
            std::fs::copy(&p, &d).unwrap();
        }
    }
}
