"""The directory watcher the guardian and the hosts file rely on, polled (no reactor needed)."""

from __future__ import annotations

import os

from networkd.dirwatch import DirectoryWatcher, FileChangeWatcher, directories_of


def write(path, text):
    with open(path, "w") as f:
        f.write(text)


def replace(path, text):
    write(f"{path}.tmp", text)
    os.replace(f"{path}.tmp", path)


def test_directories_of_groups_names_by_directory():
    assert directories_of("/etc/resolv.conf", "/run/resolv.conf", "/etc/hosts") == {
        "/etc": {"resolv.conf", "hosts"}, "/run": {"resolv.conf"},
    }


def test_polled_watcher_reports_only_the_names_asked_for(tmp_path):
    watcher = DirectoryWatcher(None)
    watcher.start()
    try:
        assert watcher.watch({str(tmp_path): {"hosts"}, str(tmp_path / "missing"): {"x"}}) == [
            f"cannot watch {tmp_path / 'missing'}: No such file or directory"]
        write(tmp_path / "other", "x")
        replace(tmp_path / "hosts", "10.0.0.1 a\n")
        assert {name for _, name, _ in watcher.poll()} == {"hosts"}
        assert watcher.poll() == []
    finally:
        watcher.stop()


def test_file_change_watcher_sees_edits_renames_deletes_and_symlink_targets(tmp_path):
    hosts = tmp_path / "hosts"
    write(hosts, "10.0.0.1 a\n")
    watcher = FileChangeWatcher(str(hosts))
    try:
        assert watcher.changed() and watcher.read() == "10.0.0.1 a\n"
        assert not watcher.changed()
        write(hosts, "10.0.0.2 a\n")
        assert watcher.changed() and not watcher.changed()
        replace(hosts, "10.0.0.3 a\n")
        assert watcher.changed()
        with open(hosts, "a"):
            pass  # opened for writing and closed, left as it was
        assert not watcher.changed(), "an event without a change is no change"
        os.unlink(hosts)
        assert watcher.changed() and watcher.read() is None

        (tmp_path / "real").mkdir()
        target = tmp_path / "real" / "hosts"
        write(target, "10.0.0.4 a\n")
        os.symlink(target, hosts)
        assert watcher.changed() and watcher.read() == "10.0.0.4 a\n"
        write(target, "10.0.0.5 a\n")  # behind the link: seen through the target's directory
        assert watcher.changed()
    finally:
        watcher.close()


def test_file_change_watcher_in_a_missing_directory_notices_it_appear(tmp_path):
    hosts = tmp_path / "etc" / "hosts"
    watcher = FileChangeWatcher(str(hosts))
    try:
        assert watcher.changed() and watcher.read() is None
        assert not watcher.changed()
        (tmp_path / "etc").mkdir()
        write(hosts, "10.0.0.1 a\n")
        assert watcher.changed() and watcher.read() == "10.0.0.1 a\n"
        write(hosts, "10.0.0.2 a\n")
        assert watcher.changed(), "watched once the directory is there"
    finally:
        watcher.close()


def test_file_change_watcher_compares_the_signature_every_nth_look_for_what_inotify_misses(tmp_path):
    hosts = tmp_path / "hosts"
    write(hosts, "10.0.0.1 a\n")
    watcher = FileChangeWatcher(str(hosts), recheck=3)
    try:
        assert watcher.changed()
        st = os.stat(hosts)
        os.utime(hosts, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # no event in the mask: unseen by inotify
        assert not watcher.changed()
        assert watcher.changed(), "the third look compares the signature"
        assert not watcher.changed()
    finally:
        watcher.close()
