//! Always: writes the built-in trained model (tests/fixtures/trained-moe) into OUT_DIR with its
//! weights rounded to bf16, for the binary to embed (src/model/embedded.rs).
//!
//! With the `cuda` feature: compiles every kernels/*.cu with nvcc into a fatbin (SASS for
//! sm_80/86/89/90 plus compute_80 PTX for later GPUs) that the binary embeds, writes ptxas'
//! register and spill report, and turns kernels/params.h into Rust with bindgen. Without the
//! feature it does no more, so the CPU build needs no CUDA toolchain.

#[path = "build/trained.rs"]
mod trained;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    trained::embed();
    #[cfg(feature = "cuda")]
    cuda::build();
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::env;
    use std::fmt::Write as _;
    use std::path::{Path, PathBuf};
    use std::process::Command;

    /// The PyPI wheels that provide nvcc (and the CUDA headers) where no toolkit is installed.
    const PIP_NVCC: &str = "pip install nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 \
nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-nvvm==13.0.88";
    /// The PyPI wheel that ships libclang.so for bindgen.
    const PIP_LIBCLANG: &str = "pip install libclang";
    /// GPU architectures with SASS in the fatbin; the PTX of the first one is JIT-compiled by the
    /// driver on anything newer.
    const SASS_ARCHS: [&str; 4] = ["80", "86", "89", "90"];

    /// Ends the build with one clear message (a panic would add a backtrace hint to it).
    fn fail(msg: &str) -> ! {
        eprintln!("error: {msg}");
        std::process::exit(1);
    }

    /// Python's site-packages directories (where the PyPI CUDA and libclang wheels install).
    fn site_packages() -> Vec<PathBuf> {
        let script = "import site, sys\n\
        dirs = site.getsitepackages() + [site.getusersitepackages()]\n\
        print('\\n'.join(dirs))";
        ["python3", "python"]
            .iter()
            .find_map(|py| Command::new(py).args(["-c", script]).output().ok())
            .filter(|o| o.status.success())
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .map(PathBuf::from)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// nvcc from NVCC, CUDA_HOME, PATH, then Python's site-packages, in that order.
    fn find_nvcc() -> Option<PathBuf> {
        for var in ["NVCC", "CUDA_HOME", "CUDA_PATH"] {
            println!("cargo:rerun-if-env-changed={var}");
        }
        println!("cargo:rerun-if-env-changed=PATH");
        if let Some(p) = env::var_os("NVCC").map(PathBuf::from) {
            return p.is_file().then_some(p);
        }
        let homes = ["CUDA_HOME", "CUDA_PATH"]
            .iter()
            .filter_map(|v| env::var_os(v).map(|h| PathBuf::from(h).join("bin/nvcc")));
        let path: Vec<PathBuf> = env::var_os("PATH")
            .map(|p| env::split_paths(&p).map(|d| d.join("nvcc")).collect())
            .unwrap_or_default();
        let wheels = site_packages().into_iter().flat_map(|sp| {
            ["nvidia/cu13/bin/nvcc", "nvidia/cuda_nvcc/bin/nvcc"].map(|rel| sp.join(rel))
        });
        homes.chain(path).chain(wheels).find(|p| p.is_file())
    }

    /// libclang for bindgen: LIBCLANG_PATH if set, else the PyPI wheel's copy.
    fn find_libclang() -> Option<PathBuf> {
        println!("cargo:rerun-if-env-changed=LIBCLANG_PATH");
        if let Some(p) = env::var_os("LIBCLANG_PATH") {
            return Some(PathBuf::from(p));
        }
        site_packages()
            .into_iter()
            .map(|sp| sp.join("clang/native"))
            .find(|d| d.join("libclang.so").is_file())
    }

    /// The nvcc command line for one kernel file.
    fn nvcc_args(src: &Path, out: &Path, include: &Path) -> Vec<String> {
        let mut args = vec![
            "-fatbin".to_owned(),
            "-O3".to_owned(),
            "-std=c++17".to_owned(),
            // Exact IEEE division and no contraction into FMA: the kernels must reproduce the CPU
            // engine's rounding (activation quantization, the GEMM epilogue) bit for bit.
            "-prec-div=true".to_owned(),
            "-fmad=false".to_owned(),
            "-Werror".to_owned(),
            "all-warnings".to_owned(),
            "-Xptxas".to_owned(),
            "-v".to_owned(),
            "--threads".to_owned(),
            "2".to_owned(),
            format!("-I{}", include.display()),
        ];
        for arch in SASS_ARCHS {
            args.push(format!("-gencode=arch=compute_{arch},code=sm_{arch}"));
        }
        args.push("-gencode=arch=compute_80,code=compute_80".to_owned());
        args.push("-o".to_owned());
        args.push(out.display().to_string());
        args.push(src.display().to_string());
        args
    }

    /// Keeps ptxas' per-kernel lines (registers, spills, shared memory), one report for all files.
    fn ptxas_summary(file: &str, stderr: &str, report: &mut String) {
        let _ = writeln!(report, "== {file}");
        for line in stderr.lines() {
            let l = line.trim_start_matches("ptxas info    : ");
            if l.starts_with("Compiling entry")
                || l.starts_with("Used ")
                || l.contains("bytes spill")
                || l.contains("bytes stack frame")
            {
                let _ = writeln!(report, "  {l}");
            }
        }
    }

    pub fn build() {
        let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap_or_default());
        let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap_or_default());
        let kernels = root.join("kernels");
        println!("cargo:rerun-if-changed={}", kernels.display());
        let Some(nvcc) = find_nvcc() else {
            fail(&format!(
                "the `cuda` feature needs nvcc: none in NVCC, CUDA_HOME, PATH or Python's \
                 site-packages; install the toolkit or `{PIP_NVCC}`"
            ))
        };
        compile_kernels(&nvcc, &kernels, &out_dir);
        bind_params(&kernels, &out_dir);
    }

    fn compile_kernels(nvcc: &Path, kernels: &Path, out_dir: &Path) {
        let mut sources: Vec<PathBuf> = std::fs::read_dir(kernels)
            .unwrap_or_else(|e| fail(&format!("cannot list {}: {e}", kernels.display())))
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "cu"))
            .collect();
        sources.sort();
        let mut report = format!("ptxas -v ({})\n", nvcc.display());
        let mut table = String::from("/// (module name, fatbin) for every kernels/*.cu.\n");
        table.push_str("pub const MODULES: &[(&str, &[u8])] = &[\n");
        for src in &sources {
            println!("cargo:rerun-if-changed={}", src.display());
            let stem = src.file_stem().and_then(|s| s.to_str()).unwrap_or("kernel");
            let out = out_dir.join(format!("{stem}.fatbin"));
            let summary = out_dir.join(format!("{stem}.ptxas.txt"));
            // nvcc takes minutes per file: a fatbin newer than its source and every header,
            // built by the same nvcc with the same arguments, is kept.
            let args = nvcc_args(src, &out, kernels);
            let stamp = out_dir.join(format!("{stem}.args"));
            let command = format!("{} {}", nvcc.display(), args.join(" "));
            let same_command = std::fs::read_to_string(&stamp).is_ok_and(|s| s == command);
            let cached = match (modified(&out), modified(&summary)) {
                (Some(t), Some(_)) if same_command => {
                    newest_input(src, kernels).is_some_and(|i| i < t)
                }
                _ => false,
            };
            if !cached {
                let output = Command::new(nvcc)
                    .args(&args)
                    .output()
                    .unwrap_or_else(|e| fail(&format!("cannot run {}: {e}", nvcc.display())));
                let stderr = String::from_utf8_lossy(&output.stderr);
                if !output.status.success() {
                    let _ = std::fs::remove_file(&out);
                    fail(&format!(
                        "nvcc failed on {}:\n{stderr}{}",
                        src.display(),
                        String::from_utf8_lossy(&output.stdout)
                    ));
                }
                let mut one = String::new();
                ptxas_summary(&format!("{stem}.cu"), &stderr, &mut one);
                write(&summary, &one);
                write(&stamp, &command);
            }
            report.push_str(&std::fs::read_to_string(&summary).unwrap_or_default());
            let _ = writeln!(
                table,
                "    ({stem:?}, include_bytes!({:?})),",
                out.display()
            );
        }
        table.push_str("];\n");
        write(&out_dir.join("kernels.rs"), &table);
        write(&out_dir.join("ptxas-v.txt"), &report);
        // CI prints the report from a path it chooses.
        println!("cargo:rerun-if-env-changed=EDGEMOE_PTXAS_REPORT");
        if let Some(p) = env::var_os("EDGEMOE_PTXAS_REPORT") {
            write(Path::new(&p), &report);
        }
    }

    fn modified(p: &Path) -> Option<std::time::SystemTime> {
        std::fs::metadata(p).and_then(|m| m.modified()).ok()
    }

    /// The latest modification time of `src` and the headers in `kernels`.
    fn newest_input(src: &Path, kernels: &Path) -> Option<std::time::SystemTime> {
        let headers = std::fs::read_dir(kernels)
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path()));
        let headers = headers.filter(|p| p.extension().is_some_and(|x| x == "h" || x == "cuh"));
        std::iter::once(src.to_path_buf())
            .chain(headers)
            .map(|p| modified(&p))
            .collect::<Option<Vec<_>>>()?
            .into_iter()
            .max()
    }

    fn bind_params(kernels: &Path, out_dir: &Path) {
        let header = kernels.join("params.h");
        match find_libclang() {
            // clang-sys (bindgen's loader) reads LIBCLANG_PATH in this process.
            Some(dir) => env::set_var("LIBCLANG_PATH", dir),
            None => fail(&format!(
                "the `cuda` feature needs libclang for bindgen: set LIBCLANG_PATH or `{PIP_LIBCLANG}`"
            )),
        }
        let bindings = bindgen::Builder::default()
            .header(header.display().to_string())
            .allowlist_type("Em.*")
            .derive_default(true)
            .derive_debug(true)
            .derive_copy(true)
            .generate()
            .unwrap_or_else(|e| fail(&format!("bindgen failed on {}: {e}", header.display())));
        bindings
            .write_to_file(out_dir.join("params.rs"))
            .unwrap_or_else(|e| fail(&format!("cannot write params.rs: {e}")));
    }

    fn write(path: &Path, text: &str) {
        std::fs::write(path, text)
            .unwrap_or_else(|e| fail(&format!("cannot write {}: {e}", path.display())));
    }
}
