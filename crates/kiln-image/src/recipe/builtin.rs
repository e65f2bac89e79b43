//! The built-in recipes: the repository's `images/*.toml`, compiled in and parsed by the same
//! code as a user's recipe file (so `kiln image build base` and `kiln image build
//! images/base.toml` build the same image).
//!
//! Built-in recipes copy files only with `content` (there is no directory beside them at run
//! time).

use std::path::Path;

use super::Recipe;
use crate::error::ImageError;

/// Name and TOML text of each built-in recipe, in presentation order.
const BUILTIN: &[(&str, &str)] = &[
    ("base", include_str!("../../../../images/base.toml")),
    ("python", include_str!("../../../../images/python.toml")),
    ("postgres", include_str!("../../../../images/postgres.toml")),
    ("node", include_str!("../../../../images/node.toml")),
    ("ruby", include_str!("../../../../images/ruby.toml")),
    ("go", include_str!("../../../../images/go.toml")),
    ("rust", include_str!("../../../../images/rust.toml")),
    ("c", include_str!("../../../../images/c.toml")),
    ("cpp", include_str!("../../../../images/cpp.toml")),
    ("bash", include_str!("../../../../images/bash.toml")),
    ("desktop", include_str!("../../../../images/desktop.toml")),
];

/// Names of the built-in recipes, in presentation order.
pub fn builtin_names() -> &'static [&'static str] {
    &[
        "base", "python", "postgres", "node", "ruby", "go", "rust", "c", "cpp", "bash", "desktop",
    ]
}

/// The built-in recipe called `name`, if there is one.
pub fn builtin(name: &str) -> Option<Recipe> {
    let (_, text) = BUILTIN.iter().find(|(n, _)| *n == name)?;
    let file = format!("images/{name}.toml");
    // The texts are part of the build and tested below: a parse error is a kiln bug.
    match super::file::parse(&file, text, Path::new("/nonexistent"), None) {
        Ok(r) => Some(r),
        Err(e) => panic!("built-in recipe {file} does not parse: {e}"),
    }
}

/// Like [`builtin`], but an unknown name is an error that lists the known ones.
pub fn lookup(name: &str) -> Result<Recipe, ImageError> {
    builtin(name).ok_or_else(|| ImageError::UnknownRecipe {
        name: name.to_owned(),
        known: builtin_names().join(", "),
    })
}

#[cfg(test)]
mod tests {
    use super::super::{ProbeCheck, validate_name};
    use super::*;

    #[test]
    fn builtin_every_name_resolves_and_is_valid() {
        assert_eq!(
            BUILTIN.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
            builtin_names()
        );
        for name in builtin_names() {
            let r = builtin(name).expect("listed recipes exist");
            assert_eq!(r.name, *name);
            validate_name(name).expect("valid name");
            assert!(r.test.is_some(), "{name} has a self-test command");
        }
    }

    #[test]
    fn builtin_python_is_base_plus_full_python3() {
        let base = builtin("base").expect("base");
        let python = builtin("python").expect("python");
        assert!(python.packages.contains(&"python3".to_owned()));
        assert!(base.packages.iter().all(|p| python.packages.contains(p)));
        assert!(!base.packages.iter().any(|p| p.starts_with("python")));
    }

    #[test]
    fn builtin_postgres_is_base_plus_postgresql() {
        let base = builtin("base").expect("base");
        let pg = builtin("postgres").expect("postgres");
        assert_eq!(
            pg.suite, "bookworm",
            "the hooks hard-code bookworm's major version 15"
        );
        assert!(pg.packages.contains(&"postgresql".to_owned()));
        assert!(base.packages.iter().all(|p| pg.packages.contains(p)));
    }

    #[test]
    fn builtin_postgres_has_hooks_probe_and_password_hook() {
        let pg = builtin("postgres").expect("postgres");
        let [conf] = pg.files.as_slice() else {
            panic!("one file: {:?}", pg.files)
        };
        assert!(conf.dst.ends_with("conf.d/kiln.conf"));
        let [check] = pg.run.as_slice() else {
            panic!("one build step: {:?}", pg.run)
        };
        assert!(check.argv.join(" ").contains("PG_VERSION"));
        let [start] = pg.on_boot.as_slice() else {
            panic!("one on_boot command: {:?}", pg.on_boot)
        };
        assert!(start.argv.join(" ").contains("pg_ctl start -w"));
        assert!(start.argv.join(" ").contains("/run/postgresql"));
        assert_eq!(start.timeout_ms, 120_000);
        let probe = pg.readiness_probe.as_ref().expect("probe");
        let ProbeCheck::Command(probe_cmd) = &probe.check else {
            panic!("command probe: {probe:?}")
        };
        assert!(probe_cmd.argv[0].ends_with("pg_isready"));
        assert!(probe_cmd.argv.windows(2).any(|w| w == ["-h", "127.0.0.1"]));
        assert_eq!(
            (probe.interval_ms, probe.deadline_ms, probe_cmd.timeout_ms),
            (100, 60_000, 5_000)
        );
        let hook = pg.on_restore.as_ref().expect("on_restore");
        let script = hook.argv.join(" ");
        assert!(script.contains("/run/secrets/PGPASSWORD"), "{script}");
        assert!(script.contains("ON_ERROR_STOP=1"), "{script}");
    }

    #[test]
    fn builtin_shell_snippets_parse() {
        for name in builtin_names() {
            let r = builtin(name).expect("listed");
            let probe = r.readiness_probe.iter().filter_map(|p| match &p.check {
                ProbeCheck::Command(c) => Some(c),
                ProbeCheck::TcpPort { .. } => None,
            });
            let all = r
                .run
                .iter()
                .chain(&r.on_boot)
                .chain(probe)
                .chain(&r.on_restore)
                .chain(&r.test);
            for c in
                all.filter(|c| c.argv.len() == 3 && c.argv[0].ends_with("sh") && c.argv[1] == "-c")
            {
                let out = std::process::Command::new("sh")
                    .args(["-n", "-c", &c.argv[2]])
                    .output()
                    .expect("run sh -n");
                assert!(
                    out.status.success(),
                    "{name}: {}\n{}",
                    c.argv[2],
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }

    #[test]
    fn builtin_language_images_extend_base_and_self_test_a_hello_world() {
        let base = builtin("base").expect("base");
        for (name, package) in [
            ("node", "nodejs"),
            ("ruby", "ruby"),
            ("go", "golang-go"),
            ("rust", "rustc"),
            ("c", "gcc"),
            ("cpp", "g++"),
            ("bash", "bash"),
        ] {
            let r = builtin(name).expect("listed");
            assert_eq!(r.suite, "bookworm", "{name}");
            assert!(r.packages.contains(&package.to_owned()), "{name}");
            assert!(
                base.packages.iter().all(|p| r.packages.contains(p)),
                "{name}"
            );
            let test = r.test.as_ref().expect("self-test").argv.join(" ");
            assert!(
                test.contains(&format!("hello from {name}")),
                "{name}: {test}"
            );
        }
    }

    #[test]
    fn builtin_compiled_languages_warm_their_compiler_before_capture() {
        for (name, compiler) in [
            ("go", "go build"),
            ("rust", "rustc"),
            ("c", "gcc"),
            ("cpp", "g++"),
        ] {
            let r = builtin(name).expect("listed");
            let [warm] = r.on_boot.as_slice() else {
                panic!("{name}: one on_boot command: {:?}", r.on_boot)
            };
            assert!(warm.argv.join(" ").contains(compiler), "{name}: {warm:?}");
        }
        for name in ["python", "node", "ruby", "bash"] {
            assert!(builtin(name).expect("listed").on_boot.is_empty(), "{name}");
        }
        let go = builtin("go").expect("go");
        assert_eq!(
            go.env.get("GOCACHE").map(String::as_str),
            Some("/var/cache/go-build")
        );
    }

    #[test]
    fn builtin_postgres_round_trips_through_json() {
        let mut pg = builtin("postgres").expect("postgres");
        let json = serde_json::to_string(&pg).expect("json");
        let back: Recipe = serde_json::from_str(&json).expect("parse");
        // The content's origin is for the build only; the manifest keeps its sha256.
        for f in &mut pg.files {
            f.source = None;
        }
        assert_eq!(back, pg);
    }

    #[test]
    fn lookup_unknown_lists_known_recipes() {
        let err = lookup("cobol").expect_err("unknown");
        let msg = err.to_string();
        assert!(
            msg.contains("cobol") && msg.contains("base, python, postgres, node"),
            "{msg}"
        );
    }
}
