"""Configuration: defaults with no file, and errors that name the bad key."""

from pathlib import Path

import pytest

from backendd.config import Config, ConfigFileError, load_config, parse_config


def test_no_file_gives_working_defaults(tmp_path: Path) -> None:
    config = parse_config("")
    assert config == Config()
    assert config.daemon.socket.endswith(".sock")
    assert config.peer_allowed(0)
    assert config.image_allowed("/anything/at/all.img")
    assert config.bridge_allowed("br0")


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigFileError, match=r"missing\.toml"):
        load_config(tmp_path / "missing.toml")


def test_full_file_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "backendd.toml"
    path.write_text(
        '[daemon]\nsocket = "/run/x.sock"\nallowed_uids = [1000, 1001]\nio_threads = 8\n'
        'poll_us = 0\n'
        '[block]\nallowed_dirs = ["/srv/images"]\n'
        '[network]\nallowed_bridges = ["xenbr0"]\nattach_existing_taps = true\n'
        '[metrics]\nlisten = "127.0.0.1:9466"\n')
    config = load_config(path)
    assert config.daemon.socket == "/run/x.sock"
    assert config.daemon.poll_us == 0 and Config().daemon.poll_us == 30
    assert config.peer_allowed(1001) and not config.peer_allowed(1002)
    assert config.image_allowed("/srv/images/a.img")
    assert not config.image_allowed("/srv/imagesX/a.img")
    assert not config.image_allowed("/srv/images/../etc/passwd")
    assert config.bridge_allowed("xenbr0") and not config.bridge_allowed("br1")
    assert config.network.attach_existing_taps
    assert not Config().network.attach_existing_taps


@pytest.mark.parametrize(("text", "named"), [
    ("[daemon]\nsokcet = 'x'\n", "[daemon] sokcet: unknown key"),
    ("[deamon]\n", "[deamon]: unknown section"),
    ("[daemon]\nio_threads = 'four'\n", "[daemon] io_threads: expected an integer"),
    ("[daemon]\nio_threads = true\n", "[daemon] io_threads: expected an integer"),
    ("[daemon]\nio_threads = 0\n", "[daemon] io_threads: 0 is outside"),
    ("[daemon]\npoll_us = -1\n", "[daemon] poll_us: -1 is not between 0 and 1000"),
    ("[daemon]\npoll_us = 5000\n", "[daemon] poll_us: 5000 is not between"),
    ("[daemon]\nallowed_uids = [1, 'x']\n", "[daemon] allowed_uids[1]"),
    ("[daemon]\nlog_level = 'loud'\n", "[daemon] log_level"),
    ("[block]\nallowed_dirs = ['relative/dir']\n", "[block] allowed_dirs"),
    ("[metrics]\nlisten = '0.0.0.0:9466'\n", "[metrics] listen"),
    ("[network]\nattach_existing_taps = 1\n", "[network] attach_existing_taps: expected true"),
    ("daemon = 3\n", "[daemon]: expected a table"),
    ("[daemon\n", "not valid TOML"),
])
def test_bad_keys_are_named(text: str, named: str) -> None:
    with pytest.raises(ConfigFileError) as info:
        parse_config(text, "test.toml")
    message = str(info.value)
    assert message.startswith("test.toml: ")
    assert named in message
