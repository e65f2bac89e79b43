//! Files against real VMs: a 256 MiB file in and out with equal sha256 and the daemon's
//! memory bounded, a directory tree round trip with modes and a symlink, stdin/stdout tar
//! streams, listings, the small operations, files in user snapshots, a paused sandbox
//! refusing a copy, and bad input answered with the documented 4xx (never a 5xx).

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::process::Stdio;

use kiln_e2e::{Kiln, api_request, assert_success, rss_kib, sha256_hex, stderr, stdout};

fn sh(k: &Kiln, id: &str, script: &str) -> String {
    let out = k.run(&["exec", id, "--", "sh", "-c", script]);
    assert_success(&out, script);
    stdout(&out)
}

#[test]
#[ignore = "boots VMs: run by scripts/test"]
fn big_file_round_trip_keeps_bytes_and_bounds_daemon_memory() {
    let k = Kiln::isolated();
    let id = k.create("base");
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("big.bin");
    // 256 MiB of varied bytes (a counter per 8-byte word, so any shifted or lost block shows).
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&src).expect("create"));
        for i in 0u64..(256 << 20) / 8 {
            f.write_all(&i.wrapping_mul(0x9E37_79B9_7F4A_7C15).to_le_bytes())
                .expect("write");
        }
    }
    std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o640)).expect("chmod");
    let want = sha256_hex(&std::fs::read(&src).expect("read"));
    let daemon = k.daemon_pid().expect("daemon");
    let (rss_before, _) = rss_kib(daemon);

    let out = k.run(&[
        "cp",
        src.to_str().unwrap(),
        &format!("{id}:/root/big.bin"),
        "--json",
    ]);
    assert_success(&out, "cp in");
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).expect("cp json");
    assert_eq!(info["size"], 256u64 << 20);
    assert_eq!(info["mode"], 0o640);
    let guest_sum = sh(&k, &id, "sha256sum /root/big.bin | cut -d' ' -f1");
    assert_eq!(guest_sum.trim(), want, "bytes changed on the way in");

    let back = dir.path().join("back.bin");
    let out = k.run(&["cp", &format!("{id}:/root/big.bin"), back.to_str().unwrap()]);
    assert_success(&out, "cp out");
    assert_eq!(sha256_hex(&std::fs::read(&back).expect("read back")), want);
    assert_eq!(
        std::fs::metadata(&back).expect("meta").permissions().mode() & 0o777,
        0o640
    );
    // Both ways streamed: the daemon's peak memory grew by far less than the file.
    let (_, peak) = rss_kib(daemon);
    assert!(
        peak.saturating_sub(rss_before) < 64 << 10,
        "daemon peak RSS grew from {rss_before} KiB to {peak} KiB for a 256 MiB transfer"
    );
    assert_success(&k.run(&["rm", &id]), "rm");
}

#[test]
#[ignore = "boots VMs: run by scripts/test"]
fn directory_trees_stdio_tars_listings_and_small_operations() {
    let k = Kiln::isolated();
    let id = k.create("base");
    let dir = tempfile::tempdir().expect("tempdir");
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(tree.join("a/b")).expect("mkdir");
    std::fs::create_dir_all(tree.join("empty")).expect("mkdir");
    std::fs::write(tree.join("a/b/run.sh"), "#!/bin/sh\necho hi\n").expect("write");
    std::fs::set_permissions(
        tree.join("a/b/run.sh"),
        std::fs::Permissions::from_mode(0o750),
    )
    .expect("chmod");
    std::fs::write(tree.join("top.txt"), "top\n").expect("write");
    std::os::unix::fs::symlink("a/b/run.sh", tree.join("link")).expect("symlink");

    // Into an existing directory, the tree keeps its name (docker cp).
    let out = k.run(&["cp", tree.to_str().unwrap(), &format!("{id}:/srv")]);
    assert_success(&out, "cp dir in");
    let listing = sh(
        &k,
        &id,
        "cd /srv/tree && find . | sort && stat -c '%a %n' a/b/run.sh && readlink link && ./a/b/run.sh",
    );
    assert_eq!(
        listing,
        ".\n./a\n./a/b\n./a/b/run.sh\n./empty\n./link\n./top.txt\n750 a/b/run.sh\na/b/run.sh\nhi\n"
    );
    // kiln ls, by name and as JSON.
    let out = k.run(&["ls", &format!("{id}:/srv/tree"), "--json"]);
    assert_success(&out, "ls");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ls json");
    let names: Vec<&str> = v["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| e["path"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "/srv/tree/a",
            "/srv/tree/empty",
            "/srv/tree/link",
            "/srv/tree/top.txt"
        ]
    );
    assert_eq!(v["entries"][2]["kind"], "symlink");
    // A listing describes links; stat says where one points.
    let (st, body) = api_request(
        k.home(),
        "GET",
        &format!("/v1/sandboxes/{id}/files/stat?path=/srv/tree/link"),
        b"",
    );
    assert_eq!(st, 200, "{body}");
    assert!(body.contains(r#""symlink_target":"a/b/run.sh""#), "{body}");
    let out = k.run(&["ls", &format!("{id}:/srv/tree")]);
    assert!(stdout(&out).contains("drwx"), "{}", stdout(&out));

    // And back out: same tree, same modes, the symlink a symlink.
    let back = dir.path().join("back");
    let out = k.run(&["cp", &format!("{id}:/srv/tree"), back.to_str().unwrap()]);
    assert_success(&out, "cp dir out");
    assert_eq!(
        std::fs::read_to_string(back.join("top.txt")).unwrap(),
        "top\n"
    );
    assert_eq!(
        std::fs::metadata(back.join("a/b/run.sh"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o750
    );
    assert!(back.join("empty").is_dir());
    assert_eq!(
        std::fs::read_link(back.join("link")).unwrap(),
        std::path::Path::new("a/b/run.sh")
    );

    // `-`: a tar archive on stdout, and one from stdin.
    let out = k.run(&["cp", &format!("{id}:/srv/tree/a"), "-"]);
    assert_success(&out, "cp to stdout");
    let mut names: Vec<String> = tar::Archive::new(&out.stdout[..])
        .entries()
        .expect("tar entries")
        .map(|e| {
            e.expect("entry")
                .path()
                .expect("path")
                .display()
                .to_string()
        })
        .collect();
    names.sort();
    assert!(names.iter().any(|n| n.ends_with("b/run.sh")), "{names:?}");
    let out = k.run_with_stdin(&["cp", "-", &format!("{id}:/opt/unpacked")], &out.stdout);
    assert_success(&out, "cp from stdin");
    assert_eq!(sh(&k, &id, "/opt/unpacked/b/run.sh"), "hi\n");

    // mkdir -p, rename, remove through the API.
    let home = k.home();
    let (st, body) = api_request(
        home,
        "POST",
        &format!("/v1/sandboxes/{id}/files/mkdir"),
        br#"{"path":"/data/x/y","mode":448}"#,
    );
    assert_eq!(st, 201, "{body}");
    assert!(body.contains("\"mode\":448"), "{body}");
    let (st, body) = api_request(
        home,
        "POST",
        &format!("/v1/sandboxes/{id}/files/rename"),
        br#"{"from":"/data/x","to":"/data/z"}"#,
    );
    assert_eq!(st, 200, "{body}");
    let (st, body) = api_request(
        home,
        "DELETE",
        &format!("/v1/sandboxes/{id}/files?path=/data"),
        b"",
    );
    assert_eq!(st, 409, "a non-empty directory needs recursive: {body}");
    assert!(body.contains("file_conflict"), "{body}");
    let (st, _) = api_request(
        home,
        "DELETE",
        &format!("/v1/sandboxes/{id}/files?path=/data&recursive=true"),
        b"",
    );
    assert_eq!(st, 204);
    assert_eq!(
        sh(&k, &id, "ls /data 2>&1 || echo gone"),
        "ls: cannot access '/data': No such file or directory\ngone\n"
    );
    assert_success(&k.run(&["rm", &id]), "rm");
}

#[test]
#[ignore = "boots VMs: run by scripts/test"]
fn bad_file_input_gets_documented_4xx_and_state_is_respected() {
    let k = Kiln::isolated();
    let id = k.create("base");
    let home = k.home();
    let long = "x".repeat(300);
    let cases: Vec<(String, &str, u16, &str)> = vec![
        (
            "/v1/sandboxes/sb-000000000000/files/stat?path=/etc".to_owned(),
            "GET",
            404,
            "sandbox_not_found",
        ),
        (
            format!("/v1/sandboxes/{id}/files/stat?path=etc"),
            "GET",
            400,
            "bad_request",
        ),
        (
            format!("/v1/sandboxes/{id}/files/stat?path=/etc%00x"),
            "GET",
            400,
            "bad_request",
        ),
        (
            format!("/v1/sandboxes/{id}/files/stat?path=/{long}"),
            "GET",
            400,
            "invalid_path",
        ),
        (
            format!("/v1/sandboxes/{id}/files/stat?path=/no/such"),
            "GET",
            404,
            "file_not_found",
        ),
        (
            format!("/v1/sandboxes/{id}/files/stat"),
            "GET",
            400,
            "bad_request",
        ),
        (
            format!("/v1/sandboxes/{id}/files?path=/etc"),
            "GET",
            409,
            "file_conflict",
        ),
        (
            format!("/v1/sandboxes/{id}/files/list?path=/etc/passwd"),
            "GET",
            409,
            "file_conflict",
        ),
        (
            format!("/v1/sandboxes/{id}/files?path=/root/f&mode=999"),
            "PUT",
            400,
            "bad_request",
        ),
        (
            format!("/v1/sandboxes/{id}/files?path=/no/such/dir/f"),
            "PUT",
            404,
            "file_not_found",
        ),
        (
            format!("/v1/sandboxes/{id}/files/mkdir"),
            "POST",
            400,
            "bad_request",
        ),
    ];
    for (path, method, want, code) in cases {
        let body: &[u8] = if path.ends_with("mkdir") {
            br#"{"path": 5}"#
        } else {
            b"data"
        };
        let (st, resp) = api_request(home, method, &path, body);
        assert_eq!(st, want, "{method} {path}: {resp}");
        assert!(
            resp.contains(&format!("\"code\":\"{code}\"")),
            "{method} {path}: {resp}"
        );
    }
    // A copy into a paused sandbox is refused with its state; nothing is written.
    let dir = tempfile::tempdir().expect("tempdir");
    let f = dir.path().join("f");
    std::fs::write(&f, "x").expect("write");
    assert_success(&k.run(&["pause", &id]), "pause");
    let out = k.run(&["cp", f.to_str().unwrap(), &format!("{id}:/root/f")]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("is paused, not running"),
        "{}",
        stderr(&out)
    );
    assert_success(&k.run(&["resume", &id]), "resume");
    assert_eq!(
        sh(&k, &id, "test -e /root/f && echo yes || echo no"),
        "no\n"
    );
    // A client killed during an upload leaves nothing at the target (the agent's abort path
    // itself is tested deterministically in-process, bins/kiln-agent/tests/files.rs).
    let mut child = k
        .cmd(&["cp", "-", &format!("{id}:/root/partial")])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn cp");
    child
        .stdin
        .as_mut()
        .expect("stdin")
        .write_all(&[0u8; 100_000])
        .expect("feed");
    kiln_e2e::signal(child.id() as i32, libc::SIGKILL);
    let _ = child.wait();
    assert_eq!(sh(&k, &id, "ls -a /root | grep -c partial || true"), "0\n");
    assert_success(&k.run(&["rm", &id]), "rm");
}

#[test]
#[ignore = "boots VMs: run by scripts/test"]
fn files_written_before_a_user_snapshot_are_in_its_restores() {
    let k = Kiln::isolated();
    let id = k.create("base");
    let dir = tempfile::tempdir().expect("tempdir");
    let f = dir.path().join("note.txt");
    std::fs::write(&f, "kept in the snapshot\n").expect("write");
    assert_success(
        &k.run(&["cp", f.to_str().unwrap(), &format!("{id}:/root/note.txt")]),
        "cp in",
    );
    let name = format!("files-{}", std::process::id());
    assert_success(&k.run(&["snapshot", &id, "--name", &name]), "snapshot");
    let out = k.run(&["create", "--snapshot", &name]);
    assert_success(&out, "restore");
    let restored = stdout(&out).trim().to_owned();
    let back = dir.path().join("back.txt");
    assert_success(
        &k.run(&[
            "cp",
            &format!("{restored}:/root/note.txt"),
            back.to_str().unwrap(),
        ]),
        "cp out of the restore",
    );
    assert_eq!(
        std::fs::read_to_string(&back).unwrap(),
        "kept in the snapshot\n"
    );
    assert_success(&k.run(&["rm", &id, &restored]), "rm");
    assert_success(&k.run(&["snapshot", "rm", &name]), "snapshot rm");
}
