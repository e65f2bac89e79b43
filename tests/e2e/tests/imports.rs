//! Image imports (issue 9): `kiln image import` of a container image built here with umoci
//! (two layers, the second deleting a file of the first; `Env`, `WorkingDir`, `Entrypoint`,
//! `Cmd` set), in its three forms (`oci-archive:`, `oci:DIR:TAG`, `docker-archive:`), of a
//! partitioned qcow2 disk image (GPT: a BIOS-boot partition, then a Linux root partition with
//! an ext4 holding busybox and an os-release), and a recipe extending an imported image.
//!
//! Every input is made locally (no registry is reachable); the images hold only Debian's
//! static busybox, so nothing of the image's own is needed to boot (no shell, no libc). The
//! imports share the shared home under names of this test's own and are removed at the end.
//! Every guest boot costs seconds under TCG: the checks share imports.

use std::path::Path;
use std::process::Command;

use kiln_e2e::{Kiln, assert_success, sha256_hex, stderr, stdout};

const BUSYBOX: &str = "/bin/busybox";

fn sh(what: &str, cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn tool(what: &str, args: &[&str]) {
    sh(what, Command::new(args[0]).args(&args[1..]));
}

/// A userland of busybox and its applet links under `root`.
fn busybox_tree(root: &Path) {
    std::fs::create_dir_all(root.join("bin")).expect("mkdir");
    std::fs::copy(BUSYBOX, root.join("bin/busybox")).expect("copy busybox");
    for applet in ["sh", "echo", "cat", "ls", "pwd", "test"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).expect("symlink");
    }
}

/// An OCI layout `dir` with image `tag`: layer 1 busybox + /deleted + /srv, layer 2 removes
/// /deleted (a whiteout); then the config.
fn oci_layout(dir: &Path, tag: &str) {
    let layout = dir.join("lay");
    let image = format!("{}:{tag}", layout.display());
    let bundle = dir.join("bundle");
    let (l, b) = (
        layout.to_str().expect("utf-8"),
        bundle.to_str().expect("utf-8"),
    );
    tool("umoci init", &["umoci", "init", "--layout", l]);
    tool("umoci new", &["umoci", "new", "--image", &image]);
    tool("umoci unpack", &["umoci", "unpack", "--image", &image, b]);
    let rootfs = bundle.join("rootfs");
    busybox_tree(&rootfs);
    std::fs::create_dir_all(rootfs.join("srv")).expect("mkdir");
    std::fs::write(rootfs.join("deleted"), "doomed\n").expect("write");
    // --refresh-bundle: the second repack must build on the first (else it replaces it).
    tool(
        "umoci repack 1",
        &["umoci", "repack", "--refresh-bundle", "--image", &image, b],
    );
    std::fs::remove_file(rootfs.join("deleted")).expect("rm");
    tool("umoci repack 2", &["umoci", "repack", "--image", &image, b]);
    tool(
        "umoci config",
        &[
            "umoci",
            "config",
            "--image",
            &image,
            "--config.env",
            "PATH=/bin",
            "--config.env",
            "GREETING=hello-from-env",
            "--config.workingdir",
            "/srv",
            "--config.entrypoint",
            "/bin/sh",
            "--config.entrypoint",
            "-c",
            "--config.cmd",
            "echo $GREETING in $(pwd)",
        ],
    );
}

fn image_info(k: &Kiln, name: &str) -> serde_json::Value {
    let out = k.run(&["image", "ls", "--json"]);
    assert_success(&out, "kiln image ls");
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("json");
    v["images"]
        .as_array()
        .expect("images")
        .iter()
        .find(|i| i["name"] == name)
        .unwrap_or_else(|| panic!("no image {name} in {v}"))
        .clone()
}

fn import(k: &Kiln, source: &str, name: &str) -> String {
    let out = k.run(&[
        "image",
        "import",
        source,
        "--name",
        name,
        "--progress",
        "plain",
    ]);
    assert_success(&out, &format!("kiln image import {source}"));
    stderr(&out)
}

#[test]
#[ignore = "boots VMs: run by scripts/test"]
fn imports_of_oci_docker_and_disk_images_boot_with_their_config() {
    let k = Kiln::shared();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let (oci, layout_img, docker, disk, ext, noshell) = (
        "e2e-imp-oci",
        "e2e-imp-layout",
        "e2e-imp-docker",
        "e2e-imp-disk",
        "e2e-imp-ext",
        "e2e-imp-noshell",
    );

    // 1. A container image: oci-archive, the layout itself, a docker-archive.
    oci_layout(d, "v1");
    let layout = d.join("lay");
    let archive = d.join("app.tar");
    let docker_archive = d.join("app-docker.tar");
    let src = format!("oci:{}:v1", layout.display());
    tool(
        "skopeo copy oci-archive",
        &[
            "skopeo",
            "--insecure-policy",
            "copy",
            "-q",
            &src,
            &format!("oci-archive:{}", archive.display()),
        ],
    );
    tool(
        "skopeo copy docker-archive",
        &[
            "skopeo",
            "--insecure-policy",
            "copy",
            "-q",
            &src,
            &format!("docker-archive:{}:app:v1", docker_archive.display()),
        ],
    );
    let log = import(&k, &format!("oci-archive:{}", archive.display()), oci);
    assert!(log.contains("2 layer(s)"), "{log}");
    assert!(log.contains("==> [6/7] self-test"), "{log}");
    let info = image_info(&k, oci);
    assert_eq!(info["entrypoint"], serde_json::json!(["/bin/sh", "-c"]));
    assert_eq!(info["cmd"], serde_json::json!(["echo $GREETING in $(pwd)"]));
    assert!(
        info["origin"]["digest"]
            .as_str()
            .is_some_and(|d| d.starts_with("sha256:")),
        "{info}"
    );
    assert_eq!(info["origin"]["filesystem"], "ext4");

    // No command: Entrypoint + Cmd, with Env and in WorkingDir.
    let out = k.run(&["run", "--image", oci]);
    assert_success(&out, "kiln run (default command)");
    assert_eq!(stdout(&out).trim(), "hello-from-env in /srv");
    // The second layer's whiteout removed /deleted.
    let out = k.run(&["run", "--image", oci, "--", "cat /deleted"]);
    assert!(!out.status.success(), "cat /deleted succeeded: {out:?}");
    assert!(stderr(&out).contains("/deleted"), "{}", stderr(&out));
    // A command given replaces Cmd (the Entrypoint stays).
    let out = k.run(&[
        "run",
        "--image",
        oci,
        "--",
        "echo replaced; ls /bin/busybox",
    ]);
    assert_success(&out, "kiln run (command given)");
    assert_eq!(stdout(&out), "replaced\n/bin/busybox\n");

    // The layout and the docker archive give the same image content and config.
    import(&k, &src, layout_img);
    import(
        &k,
        &format!("docker-archive:{}", docker_archive.display()),
        docker,
    );
    for name in [layout_img, docker] {
        let info = image_info(&k, name);
        assert_eq!(info["cmd"], serde_json::json!(["echo $GREETING in $(pwd)"]));
        let out = k.run(&["run", "--image", name]);
        assert_success(&out, &format!("kiln run --image {name}"));
        assert_eq!(stdout(&out).trim(), "hello-from-env in /srv", "{name}");
    }

    // An image without a shell: one static binary, no /bin/sh, no libc; the agent needs
    // nothing from the image.
    let bare = d.join("bare");
    let bare_image = format!("{}:v1", bare.display());
    let bare_bundle = d.join("bare-bundle");
    let bb = bare_bundle.to_str().expect("utf-8");
    tool(
        "umoci init",
        &["umoci", "init", "--layout", bare.to_str().expect("utf-8")],
    );
    tool("umoci new", &["umoci", "new", "--image", &bare_image]);
    tool(
        "umoci unpack",
        &["umoci", "unpack", "--image", &bare_image, bb],
    );
    std::fs::create_dir_all(bare_bundle.join("rootfs/bin")).expect("mkdir");
    std::fs::copy(BUSYBOX, bare_bundle.join("rootfs/bin/busybox")).expect("copy");
    std::fs::write(bare_bundle.join("rootfs/hello"), "no shell here\n").expect("write");
    tool(
        "umoci repack",
        &["umoci", "repack", "--image", &bare_image, bb],
    );
    tool(
        "umoci config",
        &[
            "umoci",
            "config",
            "--image",
            &bare_image,
            "--config.entrypoint",
            "/bin/busybox",
            "--config.cmd",
            "cat",
            "--config.cmd",
            "/hello",
        ],
    );
    import(&k, &format!("oci:{bare_image}"), noshell);
    let out = k.run(&["run", "--image", noshell]);
    assert_success(&out, "kiln run on an image without a shell");
    assert_eq!(stdout(&out), "no shell here\n");
    let out = k.run(&["run", "--image", noshell, "--", "test", "-e", "/bin/sh"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "the image has a /bin/sh: {out:?}"
    );

    // 2. A partitioned qcow2: GPT, BIOS boot partition, then the root partition.
    let tree = d.join("disk-tree");
    busybox_tree(&tree);
    std::fs::create_dir_all(tree.join("usr/lib")).expect("mkdir");
    std::fs::create_dir_all(tree.join("etc")).expect("mkdir");
    std::fs::write(
        tree.join("usr/lib/os-release"),
        "NAME=\"Kiln Test OS\"\nPRETTY_NAME=\"Kiln Test OS 1.0 (e2e)\"\nID=kilntest\n",
    )
    .expect("write");
    std::os::unix::fs::symlink("../usr/lib/os-release", tree.join("etc/os-release"))
        .expect("symlink");
    let raw = d.join("disk.raw");
    std::fs::File::create(&raw)
        .and_then(|f| f.set_len(64 << 20))
        .expect("create");
    sh(
        "sfdisk",
        Command::new("sh").arg("-c").arg(format!(
            "printf 'label: gpt\\nstart=2048, size=2048, type=21686148-6449-6E6F-744E-656564454649, name=bios\\nstart=4096, size=122880, type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709, name=root\\n' | sfdisk -q {}",
            raw.display()
        )),
    );
    let fs = d.join("root.ext4");
    std::fs::File::create(&fs)
        .and_then(|f| f.set_len(60 << 20))
        .expect("create");
    tool(
        "mkfs.ext4",
        &[
            "mkfs.ext4",
            "-q",
            "-d",
            tree.to_str().expect("utf-8"),
            fs.to_str().expect("utf-8"),
        ],
    );
    tool(
        "dd",
        &[
            "dd",
            &format!("if={}", fs.display()),
            &format!("of={}", raw.display()),
            "bs=512",
            "seek=4096",
            "conv=notrunc,sparse",
            "status=none",
        ],
    );
    let qcow2 = d.join("disk.qcow2");
    tool(
        "qemu-img convert",
        &[
            "qemu-img",
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            raw.to_str().expect("utf-8"),
            qcow2.to_str().expect("utf-8"),
        ],
    );
    let before = sha256_hex(&std::fs::read(&qcow2).expect("read"));
    // A disk image needs a name.
    let out = k.run(&["image", "import", &format!("qcow2:{}", qcow2.display())]);
    assert!(!out.status.success(), "import without --name succeeded");
    assert!(stderr(&out).contains("--name"), "{}", stderr(&out));
    let log = import(&k, &format!("qcow2:{}", qcow2.display()), disk);
    assert!(log.contains("Kiln Test OS 1.0 (e2e)"), "{log}");
    assert!(log.contains("partition 2 (Linux root (x86-64)"), "{log}");
    let info = image_info(&k, disk);
    assert_eq!(info["origin"]["os_release"], "Kiln Test OS 1.0 (e2e)");
    assert_eq!(info["origin"]["filesystem"], "ext4");
    assert_eq!(info["origin"]["size_bytes"], 60 << 20, "{info}");
    let out = k.run(&["run", "--image", disk, "--", "/bin/cat", "/etc/os-release"]);
    assert_success(&out, "kiln run on the disk image");
    assert!(
        stdout(&out).contains("PRETTY_NAME=\"Kiln Test OS 1.0 (e2e)\""),
        "{}",
        stdout(&out)
    );
    assert_eq!(
        sha256_hex(&std::fs::read(&qcow2).expect("read")),
        before,
        "the user's qcow2 changed"
    );
    // Imported images start from their warm snapshots like every image (the runs above
    // captured them).
    for name in [oci, disk] {
        let (id, source) = k.create_json(&["--image", name]);
        assert_eq!(source, "snapshot", "{name}");
        assert_success(&k.run(&["rm", &id]), "kiln rm");
    }
    // Not a qcow2: refused before anything streams, naming the format.
    let out = k.run(&[
        "image",
        "import",
        &format!("qcow2:{}", raw.display()),
        "--name",
        "e2e-imp-bad",
    ]);
    assert!(!out.status.success(), "a raw file imported as qcow2");
    assert!(
        stderr(&out).contains("not a qcow2 image"),
        "{}",
        stderr(&out)
    );

    // A disk whose root partition holds no file system: the import fails naming it, and
    // publishes nothing (no image, no build directory left).
    let empty = d.join("empty.raw");
    std::fs::File::create(&empty)
        .and_then(|f| f.set_len(16 << 20))
        .expect("create");
    sh(
        "sfdisk (empty)",
        Command::new("sh").arg("-c").arg(format!(
            "printf 'label: gpt\\nstart=2048, type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709\\n' | sfdisk -q {}",
            empty.display()
        )),
    );
    let out = k.run(&[
        "image",
        "import",
        &format!("raw:{}", empty.display()),
        "--name",
        "e2e-imp-empty",
    ]);
    assert!(!out.status.success(), "an empty disk imported");
    assert!(
        stderr(&out).contains("only ext2/3/4 root file systems can be booted"),
        "{}",
        stderr(&out)
    );
    assert!(!k.home().join("images/e2e-imp-empty").exists());

    // 3. A recipe extending the imported image: a file and a step, in the busybox guest.
    std::fs::write(
        d.join("ext.toml"),
        format!(
            "name = \"{ext}\"\nfrom = \"{oci}\"\ncmd = [\"cat /srv/added.txt /srv/step.txt; echo $GREETING\"]\n\
             run = [\"echo step-ran > /srv/step.txt\"]\n\
             [[files]]\ncontent = \"added-file\\n\"\ndst = \"/srv/added.txt\"\n"
        ),
    )
    .expect("write");
    let recipe = d.join("ext.toml");
    let out = k.run(&[
        "image",
        "build",
        recipe.to_str().expect("utf-8"),
        "--progress",
        "plain",
    ]);
    assert_success(&out, "kiln image build (extends the import)");
    let out = k.run(&["run", "--image", ext]);
    assert_success(&out, "kiln run --image (extended import)");
    assert_eq!(stdout(&out), "added-file\nstep-ran\nhello-from-env\n");

    for name in [ext, oci, layout_img, docker, disk, noshell] {
        let out = k.run(&["image", "rm", name]);
        assert_success(&out, &format!("kiln image rm {name}"));
    }
    let leftovers: Vec<String> = std::fs::read_dir(k.home().join("images"))
        .expect("images dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".tmp-e2e-imp"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "build directories left: {leftovers:?}"
    );
}
