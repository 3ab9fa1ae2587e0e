use super::*;

#[test]
fn data_folders_become_one_folder_name() {
    assert_eq!(escape_path(Path::new("/var/lib/agentd")), "var-lib-agentd");
    assert_eq!(
        escape_path(Path::new("/tmp/.tmpX y/data-1")),
        "tmp-.tmpX\\x20y-data\\x2d1"
    );
    assert_eq!(escape_path(Path::new("/.hidden")), "\\x2ehidden");
}

#[test]
fn mountinfo_lines_are_read() {
    let text = "36 25 0:31 / /sys/fs/cgroup/memory rw,relatime shared:14 - cgroup cgroup rw,memory\n\
                37 25 0:32 / /sys/fs/cgroup/unified rw,relatime shared:15 - cgroup2 cgroup2 rw\n\
                38 25 0:33 / /mnt/with\\040space rw - ext4 /dev/sda1 rw\n";
    let mounts = parse_mounts(text);
    assert_eq!(mounts.len(), 3);
    assert_eq!(mounts[0].options, "rw,memory");
    assert_eq!(mounts[1].fstype, "cgroup2");
    assert_eq!(mounts[2].point, PathBuf::from("/mnt/with space"));
}

#[test]
fn keyed_files_are_read() {
    let events = "populated 1\nfrozen 0\n";
    assert_eq!(keyed(events, "populated"), Some(1));
    assert_eq!(keyed(events, "frozen"), Some(0));
    assert_eq!(
        keyed("oom_kill_disable 0\nunder_oom 0\noom_kill 3\n", "oom_kill"),
        Some(3)
    );
    assert_eq!(keyed(events, "missing"), None);
}
