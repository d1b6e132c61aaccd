//! The `asa` command line. Every failure is one line on stderr and exit code 1 (2 for usage
//! errors, from clap); no panics reach the user.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use asa::error::{AsaError, Result};
use asa::{checkpoint, parity};

#[derive(Parser)]
#[command(
    name = "asa",
    version,
    about = "Training and analysis toolkit for Addressed State Models (ASM)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Device {
    Auto,
    Cpu,
    Cuda,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run reference fixture folders and report the worst error of each case against its tolerance.
    Parity {
        /// Case folders, or folders holding case folders (e.g. tests/fixtures).
        #[arg(required = true)]
        dirs: Vec<PathBuf>,
        #[arg(long, value_enum, default_value_t = Device::Cpu)]
        device: Device,
        /// Also print every compared tensor.
        #[arg(long)]
        verbose: bool,
    },
    /// Convert a PyTorch checkpoint (torch.save .pt) into safetensors with the reference's key names.
    Convert {
        /// Input `.pt` file (a training-notebook dict {cfg, model, ...} or a bare state dict).
        input: PathBuf,
        /// Output `.safetensors` file.
        output: PathBuf,
        /// Model config JSON to use when the .pt file carries none.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Where to write the config (default: config.json beside OUTPUT).
        #[arg(long)]
        config_out: Option<PathBuf>,
    },
}

fn resolve_device(d: Device) -> Result<()> {
    match d {
        Device::Cpu => Ok(()),
        Device::Auto => {
            eprintln!("device: cpu (the CUDA backend is not part of this build yet)");
            Ok(())
        }
        Device::Cuda => Err(AsaError::Device(
            "--device cuda is not available: the CUDA backend is not part of this build yet; use --device cpu".into(),
        )),
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.cmd {
        Cmd::Parity {
            dirs,
            device,
            verbose,
        } => {
            resolve_device(device)?;
            let cases = parity::find_cases(&dirs)?;
            let mut failed = 0;
            for dir in &cases {
                let rep = parity::run_case(dir);
                println!("{}", rep.line());
                if verbose {
                    for c in &rep.checks {
                        println!(
                            "    {:<48} {:.3e} (tol {:.0e}){}",
                            c.name,
                            c.err,
                            c.tol,
                            if c.ok() { "" } else { "  FAIL" }
                        );
                    }
                }
                if !rep.passed() {
                    failed += 1;
                }
            }
            println!("{} passed, {} failed", cases.len() - failed, failed);
            Ok(if failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Cmd::Convert {
            input,
            output,
            config,
            config_out,
        } => {
            let s =
                checkpoint::convert_pt(&input, &output, config.as_deref(), config_out.as_deref())?;
            println!(
                "wrote {} ({} tensors, {} values{}), config {}",
                output.display(),
                s.num_tensors,
                s.num_elements,
                if s.legacy {
                    ", legacy names mapped"
                } else {
                    ""
                },
                s.config_path.display()
            );
            if let Some(step) = s.step {
                println!(
                    "checkpoint step {step}{}",
                    s.best_val
                        .map(|v| format!(", best_val {v}"))
                        .unwrap_or_default()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn main() -> ExitCode {
    // a bug must still end as one line, not a backtrace
    std::panic::set_hook(Box::new(|info| {
        eprintln!("error: internal error (please report): {info}");
    }));
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
