//! Image recipes from files (issue 9): `kiln image build PATH.toml`, `kiln run --image
//! PATH.toml`, a recipe that extends another user image, files and build steps in a build
//! guest, the image's env/workdir/cmd, staleness (a changed file or a changed parent rebuilds,
//! saying so), precise errors for bad recipes, and failed steps or self-tests that publish
//! nothing.
//!
//! The images are built into the shared home (their parent is the shared `base`) under names
//! of this test's own, and removed at the end.

use std::path::Path;

use kiln_e2e::{Kiln, assert_success, stderr, stdout};

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).expect("write");
}

/// Names of the images built, with no `.tmp-` build directory of `prefix` left over.
fn images(k: &Kiln, prefix: &str) -> Vec<String> {
    let out = k.run(&["image", "ls", "--json"]);
    assert_success(&out, "kiln image ls");
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("json");
    let leftovers: Vec<String> = std::fs::read_dir(k.home().join("images"))
        .expect("images dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&format!(".tmp-{prefix}")))
        .collect();
    assert!(
        leftovers.is_empty(),
        "build directories left: {leftovers:?}"
    );
    v["images"]
        .as_array()
        .expect("images")
        .iter()
        .map(|i| i["name"].as_str().expect("name").to_owned())
        .filter(|n| n.starts_with(prefix))
        .collect()
}

#[test]
#[ignore = "boots VMs: run by scripts/test"]
fn recipe_files_build_run_rebuild_when_stale_and_fail_precisely() {
    let k = Kiln::shared();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let (app, tool) = ("e2e-recipe-app", "e2e-recipe-tool");
    // The shared home keeps images between runs: a run cut short leaves these behind, and
    // this test's first build must be a real one.
    for name in [tool, app] {
        let _ = k.run(&["image", "rm", name]);
    }
    assert!(
        !stdout(&k.run(&["image", "ls"])).contains(app),
        "{app} still listed after kiln image rm"
    );

    // A parent recipe (extends the built-in base) and a child that extends it.
    write(&d.join("greeting.txt"), "hello v1\n");
    write(
        &d.join("app.toml"),
        &format!(
            r#"# An e2e recipe.
name = "{app}"
from = "base"
env = {{ GREETING = "from-env" }}
workdir = "/srv/app"
cmd = ["/bin/sh", "-c", "cat greeting.txt; echo $GREETING; pwd; cat built.txt"]
run = [
  "echo built-by-step > built.txt && echo step-ran",
  # 32 MiB written to disk and deleted: blocks the compaction gives back.
  "dd if=/dev/urandom of=/srv/junk bs=1M count=32 2>/dev/null && sync && rm /srv/junk && sync",
]
test = "test -s /srv/app/built.txt"

[[files]]
src = "greeting.txt"
dst = "/srv/app/greeting.txt"
mode = "0640"
owner = "nobody"
"#
        ),
    );
    write(
        &d.join("tool.toml"),
        &format!(
            "name = \"{tool}\"\nfrom = \"{app}\"\npackages = [\"jq\"]\n\
             cmd = [\"/bin/sh\", \"-c\", \"cat /srv/app/greeting.txt; cat /tool.txt; jq -n 6*7\"]\n\
             [[files]]\ncontent = \"tool file\\n\"\ndst = \"/tool.txt\"\n"
        ),
    );
    let app_toml = d.join("app.toml");
    let app_path = app_toml.to_str().expect("utf-8");
    let tool_toml = d.join("tool.toml");
    let tool_path = tool_toml.to_str().expect("utf-8");

    // 1. Build with plain progress: stages, steps and the self-test are whole-line markers.
    let out = k.run(&["image", "build", app_path, "--progress", "plain"]);
    assert_success(&out, "kiln image build app.toml");
    let log = stderr(&out);
    for marker in [
        "==> [1/8] resolve",
        "==> step 1/3: copy /srv/app/greeting.txt",
        "==> step 2/3: run `echo built-by-step",
        "step-ran",
        "==> step 2: exit 0",
        "==> [7/8] self-test",
        "==> compacted: ",
        &format!("built image {app}"),
    ] {
        assert!(log.contains(marker), "{marker:?} missing from:\n{log}");
    }
    // Compaction gave back the deleted 32 MiB (its report: before -> after on disk).
    let compacted = log
        .lines()
        .find(|l| l.starts_with("==> compacted: "))
        .expect("compacted line");
    let mib = |text: &str| -> f64 {
        let (n, unit) = text.trim().split_once(' ').expect("N UNIT");
        let n: f64 = n.parse().expect("number");
        match unit {
            "MiB" => n,
            "GiB" => n * 1024.0,
            "KiB" => n / 1024.0,
            other => panic!("unit {other} in {compacted}"),
        }
    };
    let sizes = compacted
        .trim_start_matches("==> compacted: ")
        .split(" on disk")
        .next()
        .expect("sizes");
    let (before, after) = sizes.split_once(" -> ").expect("before -> after");
    assert!(
        mib(before) - mib(after) >= 30.0,
        "the deleted 32 MiB were not given back: {compacted}"
    );

    // 2. The image's default command, environment and working directory; the file's mode
    // and owner.
    let out = k.run(&["run", "--image", app]);
    assert_success(&out, "kiln run --image app");
    assert_eq!(
        stdout(&out),
        "hello v1\nfrom-env\n/srv/app\nbuilt-by-step\n",
        "{}",
        stderr(&out)
    );
    let out = k.run(&[
        "run",
        "--image",
        app,
        "--",
        "stat",
        "-c",
        "%a %U",
        "greeting.txt",
    ]);
    assert_success(&out, "stat");
    assert_eq!(stdout(&out), "640 nobody\n");

    // Started from the image's warm snapshot, like every image's sandboxes.
    let (id, source) = k.create_json(&["--image", app]);
    assert_eq!(source, "snapshot");
    let out = k.run(&["exec", &id, "--", "sh", "-c", "echo $GREETING; pwd"]);
    assert_success(&out, "exec in the recipe's sandbox");
    assert_eq!(stdout(&out), "from-env\n/srv/app\n");
    assert_success(&k.run(&["rm", &id]), "kiln rm");

    // 3. Unchanged: a no-op, said so.
    let out = k.run(&["image", "build", app_path]);
    assert_success(&out, "rebuild");
    assert!(stderr(&out).contains("is up to date"), "{}", stderr(&out));

    // 4. The child, run straight from its file (built first, parent checked first). It adds
    // a Debian package to an extended image: one bootstrap with every package, the parent's
    // files and steps re-applied, then its own.
    let out = k.run(&["run", "--image", tool_path]);
    assert_success(&out, "kiln run --image tool.toml");
    assert_eq!(
        stdout(&out),
        "hello v1\ntool file\n42\n",
        "{}",
        stderr(&out)
    );
    assert!(
        stderr(&out).contains("adds packages to an extended image"),
        "{}",
        stderr(&out)
    );

    // The parent's warm snapshot (captured by the runs above), by its image id.
    let warm_of = |name: &str| -> Vec<String> {
        let out = k.run(&["image", "ls", "--json"]);
        let v: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("json");
        let id = v["images"]
            .as_array()
            .expect("images")
            .iter()
            .find(|i| i["name"] == name)
            .map(|i| i["id"].as_str().expect("id").to_owned())
            .expect("image listed");
        std::fs::read_dir(k.home().join("snapshots"))
            .expect("snapshots dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(&format!("warm-{id}-")))
            .collect()
    };
    let app_warm = warm_of(app);
    assert!(!app_warm.is_empty(), "no warm snapshot of {app}");

    // 5. A changed file of the parent: running the child rebuilds both, saying why.
    write(&d.join("greeting.txt"), "hello v2\n");
    let out = k.run(&["run", "--image", tool]);
    assert_success(&out, "kiln run --image tool after a change");
    assert_eq!(
        stdout(&out),
        "hello v2\ntool file\n42\n",
        "{}",
        stderr(&out)
    );
    let log = stderr(&out);
    assert!(
        log.contains(&format!("rebuilding {app}: changed: its recipe's files")),
        "{log}"
    );
    assert!(
        log.contains(&format!("rebuilding {tool}: changed:"))
            && log.contains("the image it extends"),
        "{log}"
    );
    // The rebuild took the replaced image's warm snapshots along (nothing can restore them).
    for gone in &app_warm {
        assert!(
            !k.home().join("snapshots").join(gone).exists(),
            "{gone} outlived the image it was taken of"
        );
    }

    // 6. Bad recipes: file, line, column, key and what was expected.
    let bad = d.join("bad.toml");
    write(
        &bad,
        "name = \"e2e-recipe-bad\"\nfrom = \"base\"\n\npakages = [\"git\"]\n",
    );
    let out = k.run(&["image", "build", bad.to_str().expect("utf-8")]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("bad.toml:4:1: pakages: unknown field `pakages`"),
        "{err}"
    );
    write(
        &bad,
        "name = \"e2e-recipe-bad\"\nfrom = \"base\"\n[[files]]\nsrc = \"missing.txt\"\ndst = \"/x\"\n",
    );
    let out = k.run(&["image", "build", bad.to_str().expect("utf-8")]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("bad.toml:4:7: files[1].src: cannot read"),
        "{}",
        stderr(&out)
    );

    // 7. A failing step stops the build at once with its output and exit code; a failing
    // self-test fails the build; neither publishes anything.
    write(
        &bad,
        "name = \"e2e-recipe-bad\"\nfrom = \"base\"\nrun = [\"echo partial-output; exit 3\", \"echo never-runs\"]\n",
    );
    let out = k.run(&[
        "image",
        "build",
        bad.to_str().expect("utf-8"),
        "--progress",
        "plain",
    ]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("step 1/2"), "{err}");
    assert!(err.contains("exit code 3"), "{err}");
    assert!(err.contains("partial-output"), "{err}");
    assert!(!err.contains("never-runs\n"), "{err}");
    write(
        &bad,
        "name = \"e2e-recipe-bad\"\nfrom = \"base\"\ntest = \"echo self-test-said-no; exit 1\"\n",
    );
    let out = k.run(&["image", "build", bad.to_str().expect("utf-8")]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("self-test") && err.contains("self-test-said-no"),
        "{err}"
    );
    assert_eq!(images(&k, "e2e-recipe-"), [app, tool]);

    // 8. JSON progress: one event per line, the last one `done`.
    let out = k.run(&["image", "build", app_path, "--progress", "json"]);
    assert_success(&out, "json build");
    let events: Vec<serde_json::Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).expect("an event per line"))
        .collect();
    assert_eq!(events.last().expect("events")["type"], "done");
    assert_eq!(events.last().expect("events")["up_to_date"], true);

    for name in [tool, app] {
        assert_success(&k.run(&["image", "rm", name]), "image rm");
    }
    assert!(images(&k, "e2e-recipe-").is_empty());
}
