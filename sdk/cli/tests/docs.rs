//! `patchbay completions` and `patchbay man`: generated from the clap definitions, they
//! must be valid for their shell and for `man`, and cover every command and option.

use std::path::Path;
use std::process::Command;

fn patchbay(args: &[&str]) -> std::process::Output {
    let out = Command::new(env!("CARGO_BIN_EXE_patchbay"))
        .args(args)
        .output()
        .expect("run patchbay");
    assert!(
        out.status.success(),
        "patchbay {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

const COMMANDS: [&str; 13] = [
    "agents",
    "functions",
    "attach",
    "detach",
    "tracers",
    "trampolines",
    "gp",
    "sync",
    "watch",
    "counts",
    "latency",
    "run",
    "completions",
];

#[test]
fn completions_cover_every_command_and_parse() {
    let dir = tempfile::tempdir().unwrap();
    for shell in ["bash", "zsh", "fish"] {
        let out = patchbay(&["completions", shell]);
        let text = String::from_utf8(out.stdout).unwrap();
        for command in COMMANDS {
            assert!(text.contains(command), "{shell} completions lack {command}");
        }
        // Options (fish spells them `-l count`).
        for option in ["count", "socket", "interval-ms", "token-file"] {
            assert!(text.contains(option), "{shell} completions lack --{option}");
        }
        let file = dir.path().join(format!("patchbay.{shell}"));
        std::fs::write(&file, &text).unwrap();
        // Each shell's own syntax check, where the shell is installed.
        let check: &[&str] = match shell {
            "bash" => &["bash", "-n"],
            "zsh" => &["zsh", "-n"],
            _ => &["fish", "--no-execute"],
        };
        if have(check[0]) {
            let o = Command::new(check[0])
                .args(&check[1..])
                .arg(&file)
                .output()
                .unwrap();
            assert!(
                o.status.success(),
                "{shell}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        } else {
            eprintln!(
                "skipping the {shell} syntax check: {} is not installed",
                check[0]
            );
        }
    }
    // bash: the completion really completes, through the function it registers.
    let script = format!(
        "source {}; COMP_WORDS=(patchbay ru); COMP_CWORD=1; COMP_LINE='patchbay ru'; \
         COMP_POINT=${{#COMP_LINE}}; _patchbay patchbay ru patchbay; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        dir.path().join("patchbay.bash").display()
    );
    let o = Command::new("bash").args(["-c", &script]).output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "run\n",
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn man_pages_for_every_command_and_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("man");
    patchbay(&["man", out_dir.to_str().unwrap()]);
    let mut files: Vec<String> = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    let mut want: Vec<String> = COMMANDS.iter().map(|c| format!("patchbay-{c}.1")).collect();
    want.extend(["patchbay.1".into(), "patchbayd.8".into()]);
    want.sort();
    assert_eq!(files, want);
    let page = |f: &str| std::fs::read_to_string(out_dir.join(f)).unwrap();
    assert!(page("patchbay.1").starts_with(".ie"), "roff");
    assert!(page("patchbay.1").contains(".TH patchbay 1"));
    assert!(page("patchbayd.8").contains(".TH patchbayd 8"));
    for flag in [
        "config",
        "no\\-config",
        "socket\\-mode",
        "state\\-dir",
        "stall\\-threshold\\-ms",
    ] {
        assert!(
            page("patchbayd.8").contains(flag),
            "patchbayd.8 lacks --{flag}"
        );
    }
    assert!(page("patchbay-run.1").contains("agent"));
    if have("man") && have("col") {
        for f in &files {
            // `col -b` removes the overstrikes of bold text.
            let o = Command::new("sh")
                .env("MANWIDTH", "80")
                .args(["-c", "man -l \"$1\" | col -b", "sh"])
                .arg(out_dir.join(f))
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&o.stdout);
            assert!(
                o.status.success() && text.contains("NAME"),
                "man -l {f}: {text}"
            );
            let title = Path::new(f).file_stem().unwrap().to_str().unwrap();
            assert!(text.contains(title), "{f}: {text}");
        }
    } else {
        eprintln!("skipping rendering with man -l: man or col is not installed");
    }
}
