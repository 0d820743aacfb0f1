from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import trustme

import prxmail.config as prxmail_config
from prxmail._tls import Security
from prxmail.config import (
    DEFAULT_IDLE_TIMEOUT_SECS,
    DEFAULT_MAX_MESSAGE_BYTES,
    MAX_CONFIG_FILE_BYTES,
    MAX_SECRET_FILE_BYTES,
    Secret,
    default_state_dir,
    load_config,
    parse_config,
)
from prxmail.errors import ConfigError

PRX_TABLE = """\
[channels_config.email]
imap_host = "imap.gmail.com"
imap_port = 993
smtp_host = "smtp.gmail.com"
smtp_port = 465
username = "bot@example.com"
password = "app-password"
from_address = "bot@example.com"
allowed_senders = ["alice@example.com"]
"""
PATH = "$.channels_config.email"
SECRET = "app-password"


def problems_of(text: str, **kwargs: object) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, **kwargs)  # type: ignore[arg-type]
    assert SECRET not in str(info.value)
    return info.value.problems


def with_lines(*lines: str, drop: tuple[str, ...] = ()) -> str:
    kept = [line for line in PRX_TABLE.splitlines() if line.split(" =")[0] not in drop]
    return "\n".join([*kept, *lines]) + "\n"


def test_prx_table_works_unchanged_with_spec_defaults() -> None:
    config = parse_config(PRX_TABLE, environ={"HOME": "/home/u"})
    assert config.imap_host == "imap.gmail.com"
    assert config.imap_port == 993
    assert config.imap_folder == "INBOX"
    assert config.imap_security is Security.TLS
    assert config.smtp_port == 465
    assert config.smtp_security is Security.TLS
    assert config.smtp_tls is True
    assert config.username == config.smtp_username == "bot@example.com"
    assert config.password.reveal() == SECRET
    assert config.smtp_password.reveal() == SECRET
    assert config.from_address == "bot@example.com"
    assert config.idle_timeout_secs == DEFAULT_IDLE_TIMEOUT_SECS == 1740
    assert config.allowed_senders == ("alice@example.com",)
    assert config.default_subject == "PRX Message"
    assert config.tls_ca_file is None
    assert config.max_message_bytes == DEFAULT_MAX_MESSAGE_BYTES
    assert config.warnings == ()


def test_other_prx_tables_are_left_alone() -> None:
    text = '[gateway]\nport = 1\n[channels_config.telegram]\ntoken = "x"\n' + PRX_TABLE
    assert parse_config(text).imap_host == "imap.gmail.com"


def test_password_never_in_repr_or_str() -> None:
    config = parse_config(PRX_TABLE)
    assert SECRET not in repr(config)
    assert SECRET not in str(config.password)
    assert SECRET not in f"{config.smtp_password}"
    assert repr(Secret("x")) == "Secret('********')"


def test_unknown_key_named_with_suggestion() -> None:
    (problem,) = problems_of(with_lines("imap_prot = 993", drop=("imap_port",)))
    assert problem == f"unknown key 'imap_prot' (did you mean 'imap_port'?) @ {PATH}.imap_prot"


def test_several_unknown_keys_each_get_a_line() -> None:
    problems = problems_of(with_lines("zzz = 1", "smtp_hots = 'x'"))
    assert f"unknown key 'zzz' @ {PATH}.zzz" in problems
    assert any(
        p.startswith("unknown key 'smtp_hots' (did you mean 'smtp_host'?)") for p in problems
    )


def test_wrong_type_for_port() -> None:
    (problem,) = problems_of(with_lines('imap_port = "abc"', drop=("imap_port",)))
    assert problem == f"expected an integer from 1 to 65535, got 'abc' @ {PATH}.imap_port"


@pytest.mark.parametrize("value", ["0", "65536", "-1", "true", "993.0"])
def test_port_out_of_range_or_not_integer(value: str) -> None:
    (problem,) = problems_of(with_lines(f"smtp_port = {value}", drop=("smtp_port",)))
    assert problem.startswith("expected an integer from 1 to 65535")
    assert problem.endswith(f"@ {PATH}.smtp_port")


def test_string_fields_are_strict() -> None:
    (problem,) = problems_of(with_lines("imap_host = 42", drop=("imap_host",)))
    assert problem == f"expected a string, got an integer @ {PATH}.imap_host"


def test_bool_is_strict() -> None:
    (problem,) = problems_of(with_lines('smtp_tls = "yes"'))
    assert problem == f"expected true or false, got 'yes' @ {PATH}.smtp_tls"


def test_missing_required_fields_all_listed() -> None:
    problems = problems_of(with_lines(drop=("imap_host", "from_address")))
    assert f"required key missing @ {PATH}.imap_host" in problems
    assert f"required key missing @ {PATH}.from_address" in problems


def test_missing_password_explains_the_choices() -> None:
    (problem,) = problems_of(with_lines(drop=("password",)))
    assert "password, password_env or password_file" in problem


def test_wrong_type_password_does_not_echo_value() -> None:
    (problem,) = problems_of(with_lines("password = 1234567", drop=("password",)))
    assert problem == f"expected a string, got an integer @ {PATH}.password"
    assert "1234567" not in problem


def test_many_problems_reported_together() -> None:
    text = with_lines('imap_port = "abc"', "imap_prot = 1", drop=("imap_port", "smtp_host"))
    assert len(problems_of(text)) == 3


@pytest.mark.parametrize("entry", ["*@company.com", "company.com", "@", "a b@c.com", "a@@c.com"])
def test_sender_entry_that_can_never_match(entry: str) -> None:
    text = with_lines(f'allowed_senders = ["ok@example.com", "{entry}"]', drop=("allowed_senders",))
    (problem,) = problems_of(text)
    assert problem.startswith("can never match a sender: ")
    assert repr(entry) in problem
    assert problem.endswith(f"@ {PATH}.allowed_senders[1]")


def test_sender_entries_normalised_and_deduplicated() -> None:
    text = with_lines(
        'allowed_senders = [" Alice@Example.COM ", "@Company.com", "alice@example.com"]',
        drop=("allowed_senders",),
    )
    assert parse_config(text).allowed_senders == ("alice@example.com", "@company.com")


def test_policy_warnings() -> None:
    empty = parse_config(with_lines("allowed_senders = []", drop=("allowed_senders",)))
    assert any("nobody will be answered" in w for w in empty.warnings)
    star = parse_config(with_lines('allowed_senders = ["*"]', drop=("allowed_senders",)))
    assert any("anyone can make the bot answer" in w for w in star.warnings)


def test_invalid_toml_is_one_problem() -> None:
    (problem,) = problems_of("[channels_config.email\nx=")
    assert problem.startswith("not valid TOML")


def test_missing_table() -> None:
    (problem,) = problems_of('[channels_config.mail]\nimap_host = "x"\n')
    assert problem == f"missing table [channels_config.email] @ {PATH}"


@pytest.mark.parametrize(
    ("lines", "imap", "smtp"),
    [
        ((), Security.TLS, Security.TLS),
        (("imap_port = 143", "smtp_port = 587"), Security.STARTTLS, Security.STARTTLS),
        (("smtp_port = 25",), Security.TLS, Security.STARTTLS),
        (("imap_port = 10993", "smtp_port = 10465"), Security.TLS, Security.TLS),
        (("smtp_tls = false",), Security.TLS, Security.PLAIN),
        (("imap_security = 'starttls'", "imap_port = 10143"), Security.STARTTLS, Security.TLS),
        (("smtp_security = 'STARTTLS'", "smtp_port = 2525"), Security.TLS, Security.STARTTLS),
    ],
)
def test_security_from_port_or_explicit(
    lines: tuple[str, ...], imap: Security, smtp: Security
) -> None:
    config = parse_config(with_lines(*lines, drop=tuple(line.split(" =")[0] for line in lines)))
    assert config.imap_security is imap
    assert config.smtp_security is smtp


def test_plain_is_explicit_and_warned() -> None:
    config = parse_config(with_lines("imap_security = 'plain'"))
    assert config.imap_security is Security.PLAIN
    assert any("unencrypted" in w for w in config.warnings)


def test_security_bad_value_and_contradiction() -> None:
    (problem,) = problems_of(with_lines("imap_security = 'ssl'"))
    assert problem == (
        f"expected one of 'tls', 'starttls', 'plain', got 'ssl' @ {PATH}.imap_security"
    )
    (problem,) = problems_of(with_lines("smtp_tls = false", "smtp_security = 'tls'"))
    assert "contradicts" in problem


def test_mismatched_port_and_mode_is_a_warning() -> None:
    config = parse_config(
        with_lines("smtp_security = 'tls'", "smtp_port = 587", drop=("smtp_port",))
    )
    assert any("587 is normally STARTTLS" in w for w in config.warnings)


def test_password_from_environment() -> None:
    text = with_lines('password_env = "BOT_PW"', drop=("password",))
    config = parse_config(text, environ={"BOT_PW": "from-env"})
    assert config.password.reveal() == "from-env"
    (problem,) = problems_of(text, environ={})
    assert problem == f"environment variable BOT_PW is not set or empty @ {PATH}.password_env"


def test_password_env_must_be_a_name() -> None:
    (problem,) = problems_of(with_lines('password_env = "not a name"', drop=("password",)))
    assert problem.endswith(f"@ {PATH}.password_env")


def test_password_from_file_relative_to_config(tmp_path: Path) -> None:
    (tmp_path / "secret.txt").write_text("from-file\n")
    (tmp_path / "p.toml").write_text(with_lines('password_file = "secret.txt"', drop=("password",)))
    assert load_config(tmp_path / "p.toml").password.reveal() == "from-file"


def test_password_file_problems(tmp_path: Path) -> None:
    (tmp_path / "empty").write_text("\n")
    text = with_lines('password_file = "missing"', drop=("password",))
    (problem,) = problems_of(text, base_dir=tmp_path)
    assert "cannot read password file" in problem
    assert problem.endswith(f"@ {PATH}.password_file")
    text = with_lines('password_file = "empty"', drop=("password",))
    (problem,) = problems_of(text, base_dir=tmp_path)
    assert "is empty" in problem


def test_only_one_password_source() -> None:
    (problem,) = problems_of(with_lines('password_env = "X"'), environ={"X": "y"})
    assert "set only one of password, password_env" in problem


def test_separate_smtp_credentials() -> None:
    text = with_lines('smtp_username = "relay-user"', 'smtp_password_env = "RELAY_PW"')
    config = parse_config(text, environ={"RELAY_PW": "relay-secret"})
    assert config.smtp_username == "relay-user"
    assert config.smtp_password.reveal() == "relay-secret"
    assert config.password.reveal() == SECRET
    assert "relay-secret" not in repr(config)


def test_paths_resolved_and_state_dir_default(tmp_path: Path) -> None:
    trustme.CA().cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    text = with_lines('tls_ca_file = "ca.pem"', 'state_dir = "state"')
    config = parse_config(text, base_dir=tmp_path)
    assert config.tls_ca_file == tmp_path / "ca.pem"
    assert config.state_dir == tmp_path / "state"
    assert default_state_dir({"XDG_STATE_HOME": "/x/state"}) == Path("/x/state/prxmail")
    assert default_state_dir({"XDG_STATE_HOME": "relative"}).parts[-3:] == (
        ".local",
        "state",
        "prxmail",
    )


def test_size_limits_bounded() -> None:
    config = parse_config(with_lines("max_message_bytes = 1048576"))
    assert config.max_message_bytes == 1048576
    (problem,) = problems_of(with_lines("max_attachment_bytes = 10"))
    assert problem.startswith("expected an integer from 1024 to 1073741824, got 10")


def test_idle_timeout_must_be_positive() -> None:
    (problem,) = problems_of(with_lines("idle_timeout_secs = 0"))
    assert problem.endswith(f"@ {PATH}.idle_timeout_secs")


def test_from_address_must_look_like_an_address() -> None:
    (problem,) = problems_of(with_lines('from_address = "bot"', drop=("from_address",)))
    assert problem == (
        f"expected an email address like bot@example.com, got 'bot' @ {PATH}.from_address"
    )


def test_header_injection_in_values_refused() -> None:
    (problem,) = problems_of(with_lines('imap_folder = "INBOX\\r\\nX"'))
    assert problem.endswith(f"@ {PATH}.imap_folder")


def test_load_config_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.toml")


# -- service keys -------------------------------------------------------------------


def test_service_keys_have_documented_defaults() -> None:
    from prxmail.config import (
        DEFAULT_COMMAND_TIMEOUT_SECS,
        DEFAULT_HANDLER_TIMEOUT_SECS,
        DEFAULT_KEEPALIVE_SECS,
        DEFAULT_MAX_CONCURRENT_HANDLERS,
        FirstStart,
        LogFormat,
    )

    config = parse_config(PRX_TABLE)
    assert config.exec_command is None
    assert config.handler_timeout_secs == DEFAULT_HANDLER_TIMEOUT_SECS == 300
    assert config.max_concurrent_handlers == DEFAULT_MAX_CONCURRENT_HANDLERS == 4
    assert config.handler_max_attempts == 3
    assert config.mark_seen is True
    assert config.first_start is FirstStart.UNSEEN
    assert config.authserv_id is None
    assert (config.reply_rate_limit, config.reply_rate_window_secs) == (60, 3600)
    assert config.reply_rate_burst == 40
    assert config.reply_format.value == "text"
    assert config.thread_keep_incoming_text is False
    assert config.poll_interval_secs == 60
    assert config.keepalive_secs == DEFAULT_KEEPALIVE_SECS == 300
    assert config.command_timeout_secs == DEFAULT_COMMAND_TIMEOUT_SECS == 60
    assert config.fetch_batch_size == 50
    assert (config.smtp_retry_initial_secs, config.smtp_retry_max_secs) == (30, 3600)
    assert config.log_format is LogFormat.HUMAN


def test_exec_is_split_shell_like() -> None:
    config = parse_config(with_lines("""exec = 'python3 -c "print(1)" --flag'"""))
    assert config.exec_command == ("python3", "-c", "print(1)", "--flag")


@pytest.mark.parametrize("value", ['"python3 \'unbalanced"', '"   "', "3"])
def test_exec_problems_name_the_key(value: str) -> None:
    (problem,) = problems_of(with_lines(f"exec = {value}"))
    assert problem.endswith(f"@ {PATH}.exec")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("handler_timeout_secs", "0"),
        ("max_concurrent_handlers", "0"),
        ("max_concurrent_handlers", "1001"),
        ("handler_max_attempts", "0"),
        ("reply_rate_limit", "0"),
        ("reply_rate_window_secs", "-1"),
        ("reply_rate_burst", "0"),
        ("reply_format", '"html"'),
        ("thread_keep_incoming_text", '"yes"'),
        ("poll_interval_secs", "0"),
        ("keepalive_secs", '"300"'),
        ("command_timeout_secs", "1.5"),
        ("fetch_batch_size", "0"),
        ("fetch_batch_size", "5000"),
        ("mark_seen", '"yes"'),
        ("first_start", '"everything"'),
        ("log_format", '"xml"'),
    ],
)
def test_service_key_out_of_range_or_wrong_type(key: str, value: str) -> None:
    (problem,) = problems_of(with_lines(f"{key} = {value}"))
    assert problem.endswith(f"@ {PATH}.{key}")
    assert problem.startswith("expected")


def test_service_keys_set() -> None:
    from prxmail.config import FirstStart, LogFormat

    config = parse_config(
        with_lines(
            "handler_timeout_secs = 5",
            "max_concurrent_handlers = 2",
            "handler_max_attempts = 7",
            "mark_seen = false",
            'first_start = "NEW"',
            "reply_rate_limit = 1",
            "reply_rate_window_secs = 60",
            "poll_interval_secs = 10",
            "keepalive_secs = 30",
            "command_timeout_secs = 20",
            "fetch_batch_size = 5",
            "smtp_retry_initial_secs = 1",
            "smtp_retry_max_secs = 2",
            'log_format = "json"',
        )
    )
    assert config.handler_timeout_secs == 5
    assert config.max_concurrent_handlers == 2
    assert config.handler_max_attempts == 7
    assert config.mark_seen is False
    assert config.first_start is FirstStart.NEW
    assert (config.reply_rate_limit, config.reply_rate_window_secs) == (1, 60)
    assert (config.poll_interval_secs, config.keepalive_secs) == (10, 30)
    assert (config.command_timeout_secs, config.fetch_batch_size) == (20, 5)
    assert (config.smtp_retry_initial_secs, config.smtp_retry_max_secs) == (1, 2)
    assert config.log_format is LogFormat.JSON


def test_smtp_retry_max_below_initial_is_an_error() -> None:
    (problem,) = problems_of(with_lines("smtp_retry_initial_secs = 60", "smtp_retry_max_secs = 10"))
    assert problem.endswith(f"@ {PATH}.smtp_retry_max_secs")


def test_require_authentication_needs_authserv_id() -> None:
    (problem,) = problems_of(with_lines("require_authentication = true"))
    assert "authserv_id" in problem
    assert problem.endswith(f"@ {PATH}.authserv_id")


def test_authserv_id_only_used_when_required() -> None:
    off = parse_config(with_lines('authserv_id = "MX.Example.com"'))
    assert off.authserv_id is None
    on = parse_config(with_lines('authserv_id = "MX.Example.com"', "require_authentication = true"))
    assert on.authserv_id == "mx.example.com"
    (problem,) = problems_of(with_lines('authserv_id = "mx example"'))
    assert problem.endswith(f"@ {PATH}.authserv_id")


# -- files named by the configuration, hostile values -------------------------------


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    path = tmp_path / "pipe"
    os.mkfifo(path)
    return path


@pytest.fixture
def ca_pem(tmp_path: Path) -> Path:
    path = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(path))
    return path


def test_deeply_nested_toml_is_one_problem() -> None:
    text = PRX_TABLE + "deep = " + "[" * 5000 + "]" * 5000 + "\n"
    (problem,) = problems_of(text)
    assert problem.startswith("not valid TOML: nested too deeply")


@pytest.mark.timeout(10)
@pytest.mark.parametrize("key", ["password_file", "smtp_password_file"])
def test_secret_file_must_be_a_regular_file(key: str, fifo: Path) -> None:
    drop = ("password",) if key == "password_file" else ()
    for target, kind in ((fifo, "a FIFO (named pipe)"), (Path("/dev/zero"), "a character device")):
        (problem,) = problems_of(with_lines(f'{key} = "{target}"', drop=drop))
        assert (
            problem
            == f"cannot read password file {target}: {kind}, not a regular file @ {PATH}.{key}"
        )


def test_secret_file_size_is_bounded(tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.write_bytes(b"x" * (MAX_SECRET_FILE_BYTES + 1))
    (problem,) = problems_of(with_lines(f'password_file = "{big}"', drop=("password",)))
    assert f"larger than {MAX_SECRET_FILE_BYTES} bytes" in problem
    assert problem.endswith(f"@ {PATH}.password_file")


@pytest.mark.timeout(10)
def test_config_file_must_be_a_regular_file(tmp_path: Path, fifo: Path) -> None:
    for target in (fifo, Path("/dev/zero"), tmp_path):
        with pytest.raises(ConfigError, match="not a regular file"):
            load_config(target)
    big = tmp_path / "big.toml"
    big.write_bytes(b"#" * (MAX_CONFIG_FILE_BYTES + 1))
    with pytest.raises(ConfigError, match=f"larger than {MAX_CONFIG_FILE_BYTES} bytes"):
        load_config(big)


def test_tls_ca_file_is_loaded_at_config_time(tmp_path: Path, ca_pem: Path) -> None:
    config = parse_config(with_lines(f'tls_ca_file = "{ca_pem.name}"'), base_dir=tmp_path)
    assert config.tls_ca_file == ca_pem
    (problem,) = problems_of(with_lines('tls_ca_file = "missing.pem"'), base_dir=tmp_path)
    assert problem.startswith(
        f"cannot use tls_ca_file {tmp_path / 'missing.pem'}: No such file or directory"
    )
    assert problem.endswith(f"@ {PATH}.tls_ca_file")
    (tmp_path / "junk.pem").write_text("this is not a certificate\n")
    (problem,) = problems_of(with_lines('tls_ca_file = "junk.pem"'), base_dir=tmp_path)
    assert "holds no PEM certificate" in problem
    assert problem.endswith(f"@ {PATH}.tls_ca_file")
    (tmp_path / "empty.pem").write_text("")
    (problem,) = problems_of(with_lines('tls_ca_file = "empty.pem"'), base_dir=tmp_path)
    assert problem.endswith(f"@ {PATH}.tls_ca_file")


@pytest.mark.timeout(10)
def test_tls_ca_file_fifo_or_device_refused(fifo: Path) -> None:
    for target in (fifo, Path("/dev/zero")):
        (problem,) = problems_of(with_lines(f'tls_ca_file = "{target}"'))
        assert "not a regular file" in problem
        assert problem.endswith(f"@ {PATH}.tls_ca_file")


def test_tls_ca_file_bundle_with_non_ascii_comments_loads(tmp_path: Path, ca_pem: Path) -> None:
    # Distribution bundles carry UTF-8 comments (CA names) between the PEM blocks.
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes("# Főtanúsítvány\n".encode() + ca_pem.read_bytes())
    assert parse_config(with_lines(f'tls_ca_file = "{bundle}"')).tls_ca_file == bundle


@pytest.mark.parametrize("value", ["alice@example.com", "42", "true"])
def test_allowed_senders_not_a_list_is_one_problem(value: str) -> None:
    shown = f'"{value}"' if "@" in value else value
    text = with_lines(f"allowed_senders = {shown}", drop=("allowed_senders",))
    (problem,) = problems_of(text)
    assert problem.startswith("expected a list of strings, got ")
    assert problem.endswith(f"@ {PATH}.allowed_senders")


def test_allowed_senders_string_hint_shows_the_list_form() -> None:
    text = with_lines('allowed_senders = "alice@example.com"', drop=("allowed_senders",))
    (problem,) = problems_of(text)
    assert "write ['alice@example.com']" in problem


@pytest.mark.parametrize("bad", ["\\u0000", "\\r", "\\n"])
@pytest.mark.parametrize("key", ["password", "smtp_password"])
def test_password_with_nul_or_line_break_refused(key: str, bad: str) -> None:
    drop = ("password",) if key == "password" else ()
    value = f"app-{bad}-password"
    (problem,) = problems_of(with_lines(f'{key} = "{value}"', drop=drop))
    assert problem == (
        "must not contain NUL, CR or LF characters (they cannot be sent in an IMAP or"
        f" SMTP command) @ {PATH}.{key}"
    )
    assert "app-" not in problem


@pytest.mark.parametrize("bad", ["\0", "\r", "\n"])
def test_password_from_env_or_file_with_nul_or_line_break_refused(bad: str, tmp_path: Path) -> None:
    text = with_lines('password_env = "BOT_PW"', drop=("password",))
    (problem,) = problems_of(text, environ={"BOT_PW": f"app{bad}password"})
    assert problem.startswith("must not contain NUL, CR or LF")
    assert problem.endswith(f"@ {PATH}.password_env")
    (tmp_path / "pw").write_bytes(f"app{bad}password\n".encode())
    text = with_lines('smtp_password_file = "pw"')
    (problem,) = problems_of(text, base_dir=tmp_path)
    assert problem.startswith("must not contain NUL, CR or LF")
    assert problem.endswith(f"@ {PATH}.smtp_password_file")
    assert "password" not in problem.partition(" @ ")[0].removeprefix("must not contain")


def test_password_file_with_crlf_line_end_is_accepted(tmp_path: Path) -> None:
    (tmp_path / "pw").write_bytes(b"from-file\r\n")
    text = with_lines('password_file = "pw"', drop=("password",))
    assert parse_config(text, base_dir=tmp_path).password.reveal() == "from-file"


@pytest.mark.parametrize(
    ("idle", "keepalive", "shown"), [(1740, 20, 20), (1740, 300, 300), (100, 300, 100)]
)
def test_start_up_line_shows_the_effective_idle_interval(
    idle: int, keepalive: int, shown: int
) -> None:
    config = parse_config(
        with_lines(f"idle_timeout_secs = {idle}", f"keepalive_secs = {keepalive}")
    )
    assert config.idle_renewal_secs == shown
    (line,) = [line for line in config.describe() if "IDLE" in line]
    assert f"re-issue IDLE every {shown} s" in line


# Imported in a fresh interpreter with the package's __init__ bypassed: that one
# re-exports the channel (which needs trio) until it imports lazily; what is checked here
# is config's own dependency graph.
_IMPORT_PROBE = """
import sys, types
package = types.ModuleType("prxmail")
package.__path__ = [sys.argv[1]]
sys.modules["prxmail"] = package
import prxmail.config
print(" ".join(sorted(sys.modules)))
"""


def test_config_imports_no_runtime_modules() -> None:
    package_dir = Path(prxmail_config.__file__).parent
    result = subprocess.run(
        [sys.executable, "-c", _IMPORT_PROBE, str(package_dir)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    loaded = set(result.stdout.split())
    assert "prxmail.config" in loaded
    forbidden = {"prxmail.handler", "prxmail.policy", "prxmail.message", "trio", "mailparser"}
    assert not loaded & forbidden
    assert not any(name.startswith(("trio.", "mailparser.", "prxmail.message.")) for name in loaded)


def test_conversation_keys_are_read() -> None:
    from prxmail.config import ReplyFormat

    config = parse_config(
        PRX_TABLE
        + 'reply_format = "json"\nthread_keep_incoming_text = true\nreply_rate_burst = 5\n'
    )
    assert config.reply_format is ReplyFormat.JSON
    assert config.thread_keep_incoming_text is True
    assert config.reply_rate_burst == 5


def test_loop_guard_defaults_are_the_loop_rule_numbers() -> None:
    from prxmail.config import DEFAULT_LOOP_FAST_ANSWER_SECS, DEFAULT_LOOP_SLOW_DOWN_SECS
    from prxmail.conversation import FAST_ANSWER_SECS, SLOW_DOWN_SECS

    config = parse_config(PRX_TABLE)
    assert config.loop_fast_answer_secs == DEFAULT_LOOP_FAST_ANSWER_SECS == FAST_ANSWER_SECS
    assert config.loop_slow_down_secs == DEFAULT_LOOP_SLOW_DOWN_SECS == SLOW_DOWN_SECS


def test_health_listen_is_off_by_default_and_parsed() -> None:
    assert parse_config(PRX_TABLE).health_listen is None
    on = parse_config(with_lines('health_listen = "127.0.0.1:9100"'))
    assert on.health_listen == ("127.0.0.1", 9100)
    assert parse_config(with_lines('health_listen = "[::1]:9100"')).health_listen == ("::1", 9100)


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ('"localhost:9100"', "must be an IP address"),
        ('"127.0.0.1"', "expected HOST:PORT"),
        ('"127.0.0.1:0"', "1 to 65535"),
        ('"127.0.0.1:70000"', "1 to 65535"),
        ('"127.0.0.1:http"', "expected HOST:PORT"),
        ("9100", "expected a string"),
    ],
)
def test_health_listen_must_be_an_address_and_port(value: str, why: str) -> None:
    (problem,) = problems_of(with_lines(f"health_listen = {value}"))
    assert why in problem
    assert problem.endswith(f"@ {PATH}.health_listen")
