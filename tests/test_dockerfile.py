"""The Docker image recipe, checked without Docker against pyproject.toml.

No Docker engine runs where the tests run, so the Dockerfile is parsed (line continuations,
multi-stage `FROM ... AS ...`, shell commands) and its final stage and pip installs are checked:
`dli train` as the default command, the /data and /runs volumes, a non-root user, a CUDA 12 base,
torch from a CUDA 12 index, and every package installed by name declared by the project (its
dependencies and the `cuda12` extra), with no CUDA 13 package. Each check returns the problems it
finds; the mutation tests break the real Dockerfile one way at a time to show each check fails.
"""

from __future__ import annotations

import json
import posixpath
import re
import shlex
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import NormalizedName, canonicalize_name

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
PYPROJECT = REPO / "pyproject.toml"

CUDA12_PACKAGES = {canonicalize_name("nvidia-dali-cuda120"), canonicalize_name("cupy-cuda12x")}
"""The CUDA 12 builds of DALI and CuPy, which must match torch's CUDA major."""

TORCH_INDEX_COMPANIONS = {canonicalize_name("torchvision")}
"""Not declared by the project, but timm and smp need it, and it must come from torch's CUDA index."""

CUDA13 = re.compile(r"cuda-?13|cu13\d*", re.IGNORECASE)
TORCH_CUDA12_INDEX = re.compile(r"^https://download\.pytorch\.org/whl/cu12\d+/?$")
CUDA_IMAGE = re.compile(
    r"^(?:docker\.io/)?nvidia/cuda:(?P<major>\d+)\.\d+(?:\.\d+)?-(?P<flavour>[a-z0-9-]+?)"
    r"-(?:ubuntu|ubi|rockylinux|oraclelinux)[\d.]+$"
)
PIP_BOOLEAN_WORDS = {"1", "0", "true", "false", "yes", "no", "on", "off"}
"""Values of PIP_NO_CACHE_DIR that turn the cache off ("0" and "false" too, for compatibility)."""
BUILD_TOOLS = re.compile(
    r"^(build-essential|gcc(-\d+)?|g\+\+(-\d+)?|clang(-\d+)?|make|cmake|ninja-build|cuda-nvcc.*"
    r"|cuda-toolkit.*|.*-dev(:\w+)?)$"
)


# ---------------------------------------------------------------------------------------------
# Dockerfile parsing: instructions and stages. The PyPI `dockerfile` package wraps BuildKit's own
# parser, but it is a compiled extra dependency and still leaves the shell and pip arguments to
# parse; the instruction layer is short. It follows Docker's rules for continuations, comments,
# parser directives and stages, and refuses heredocs rather than misread them.


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case
    args: str  # text after the keyword, continuation lines joined as Docker joins them
    line: int  # 1-based line where the instruction starts


@dataclass
class Stage:
    index: int
    base: str  # image reference or the name of an earlier stage, build ARGs substituted
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)


@dataclass
class Dockerfile:
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        """The stage `docker build` produces without `--target`: the last one."""
        return self.stages[-1]

    def stage_named(self, reference: str, before: int) -> Stage | None:
        """An earlier stage by `AS` name (case-insensitive) or index, as `FROM`/`--from` use them."""
        for stage in self.stages[:before]:
            if (stage.name and stage.name.lower() == reference.lower()) or reference == str(stage.index):
                return stage
        return None

    def chain(self, stage: Stage) -> list[Stage]:
        """`stage` and the stages it is built on, the image-rooted one first."""
        parent = self.stage_named(stage.base, stage.index)
        return [*self.chain(parent), stage] if parent else [stage]

    def root_image(self, stage: Stage) -> str:
        return self.chain(stage)[0].base


def _logical_lines(text: str) -> Iterator[tuple[int, str]]:
    """(first line number, instruction text) with comments dropped and continuations joined."""
    escape = "\\"
    for raw in text.splitlines():  # parser directives: leading `# key=value` comments
        directive = re.match(r"^#\s*(\w+)\s*=\s*(\S+)\s*$", raw)
        if not directive:
            break
        if directive.group(1).lower() == "escape":
            escape = directive.group(2)
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue  # blank lines and comments, also inside a continued instruction
        body = raw.rstrip()
        start = start or number
        if body.endswith(escape):
            pending.append(body[: -len(escape)])
            continue
        pending.append(body)
        yield start, "".join(pending).strip()
        pending, start = [], 0
    if pending:
        raise ValueError(f"Dockerfile ends inside the instruction continued from line {start}")


def parse_dockerfile(text: str) -> Dockerfile:
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for number, line in _logical_lines(text):
        keyword, _, args = re.sub(r"\s", " ", line, count=1).partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword in {"RUN", "COPY", "ADD"} and re.search(r"<<-?\s*['\"]?[A-Za-z_]\w*", args):
            raise ValueError(f"line {number}: heredocs are not supported by this parser")
        if keyword == "FROM":
            words = [w for w in args.split() if not w.startswith("--")]
            base = re.sub(
                r"\$\{?(\w+)\}?", lambda m: global_args.get(m.group(1), m.group(0)), words[0] if words else ""
            )
            name = words[2] if len(words) >= 3 and words[1].lower() == "as" else None
            stages.append(Stage(index=len(stages), base=base, name=name))
        elif not stages:
            if keyword != "ARG":
                raise ValueError(f"line {number}: only ARG may come before the first FROM, not {keyword}")
            arg_name, _, default = args.partition("=")
            global_args[arg_name.strip()] = default.strip().strip("\"'")
        else:
            stages[-1].instructions.append(Instruction(keyword, args, number))
    if not stages:
        raise ValueError("the Dockerfile has no FROM")
    return Dockerfile(stages)


def exec_form(args: str) -> list[str] | None:
    """The JSON array of an exec-form ENTRYPOINT/CMD/RUN, or None for the shell form."""
    try:
        value = json.loads(args)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else None


def env_pairs(args: str) -> dict[str, str]:
    """`ENV K=V K2="v 2"` or the legacy `ENV K value with spaces`."""
    first = args.split(None, 1)
    if first and "=" not in first[0]:
        return {first[0]: first[1] if len(first) > 1 else ""}
    return dict(word.split("=", 1) for word in shlex.split(args))


@dataclass(frozen=True)
class Step:
    """One instruction of a stage chain with the ENV and WORKDIR in force when it runs."""

    stage: Stage
    instruction: Instruction
    env: dict[str, str]
    workdir: str


def _after(instruction: Instruction, env: dict[str, str], workdir: str) -> tuple[dict[str, str], str]:
    """ENV and WORKDIR once `instruction` has run."""
    if instruction.keyword == "ENV":
        return {**env, **env_pairs(instruction.args)}, workdir
    if instruction.keyword == "WORKDIR":
        return env, posixpath.normpath(posixpath.join(workdir, instruction.args.strip("\"'")))
    return env, workdir


def walk(dockerfile: Dockerfile, stage: Stage) -> Iterator[Step]:
    env: dict[str, str] = {}
    workdir = "/"
    for member in dockerfile.chain(stage):
        for instruction in member.instructions:
            yield Step(member, instruction, env, workdir)
            env, workdir = _after(instruction, env, workdir)


def final_config(dockerfile: Dockerfile) -> tuple[dict[str, str], str]:
    """ENV and WORKDIR of the final image."""
    env: dict[str, str] = {}
    workdir = "/"
    for step in walk(dockerfile, dockerfile.final):
        env, workdir = _after(step.instruction, step.env, step.workdir)
    return env, workdir


def final_value(dockerfile: Dockerfile, keyword: str) -> Instruction | None:
    """The last `keyword` instruction in force in the final image (inherited through stages).

    As in Docker, an ENTRYPOINT resets a CMD inherited from an earlier stage.
    """
    found: Step | None = None
    for step in walk(dockerfile, dockerfile.final):
        if step.instruction.keyword == keyword:
            found = step
        elif keyword == "CMD" and step.instruction.keyword == "ENTRYPOINT" and found:
            found = found if found.stage is step.stage else None
    return found.instruction if found else None


# ---------------------------------------------------------------------------------------------
# Shell commands inside RUN.

_SHELL_SEPARATORS = re.compile(r"^[;&|()]+$")
_SHELL_KEYWORDS = {"if", "then", "else", "elif", "do", "while", "until", "!", "{", "}"}


def shell_commands(instruction: Instruction) -> list[list[str]]:
    """The simple commands of a RUN, split at `&&`, `||`, `;` and `|`, redirections dropped."""
    as_exec = exec_form(instruction.args) if instruction.args.startswith("[") else None
    if as_exec is not None:
        return [as_exec]
    lexer = shlex.shlex(instruction.args, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = []
    current: list[str] = []
    tokens = iter(lexer)
    for token in tokens:
        if _SHELL_SEPARATORS.match(token):
            commands.append(current)
            current = []
        elif token[0] in "<>":
            next(tokens, None)  # the redirection's target
        elif not current and (token in _SHELL_KEYWORDS or re.match(r"^\w+=", token)):
            continue  # `then cmd`, `VAR=value cmd`
        else:
            current.append(token)
    commands.append(current)
    return [command for command in commands if command]


def run_commands(dockerfile: Dockerfile, stage: Stage) -> Iterator[tuple[Step, list[str]]]:
    for step in walk(dockerfile, stage):
        if step.instruction.keyword == "RUN":
            for command in shell_commands(step.instruction):
                yield step, command


_PIP_VALUE_OPTIONS = {
    "-r", "--requirement", "-c", "--constraint", "-e", "--editable", "-i", "--index-url",
    "--extra-index-url", "-f", "--find-links", "-t", "--target", "--prefix", "--root", "--src",
    "--upgrade-strategy", "--platform", "--python-version", "--implementation", "--abi",
    "--progress-bar", "--trusted-host", "--cache-dir", "-C", "--config-settings", "--global-option",
    "--log", "--proxy", "--retries", "--timeout", "--exists-action", "--cert", "--client-cert",
    "--report", "--only-binary", "--no-binary", "--root-user-action", "--python",
}  # fmt: skip


@dataclass(frozen=True)
class PipInstall:
    """One `pip install`: requirements named on the command line, local projects, options."""

    step: Step
    requirements: list[Requirement]
    local: list[tuple[str, frozenset[str]]]  # (path, extras) of `.` or `./dir[extra]`
    options: list[tuple[str, str | None]]
    unparsed: list[str]

    def option(self, *names: str) -> list[str | None]:
        return [value for option, value in self.options if option in names]

    def has_flag(self, name: str) -> bool:
        return any(option == name for option, _ in self.options)

    @property
    def names(self) -> set[NormalizedName]:
        return {canonicalize_name(r.name) for r in self.requirements}


def _pip_install_args(command: list[str]) -> list[str] | None:
    executable = posixpath.basename(command[0])
    if re.fullmatch(r"pip3?(\.\d+)?", executable):
        rest = command[1:]
    elif re.fullmatch(r"python3?(\.\d+)?", executable) and command[1:3] == ["-m", "pip"]:
        rest = command[3:]
    else:
        return None
    subcommand = next((i for i, word in enumerate(rest) if not word.startswith("-")), None)
    if subcommand is None or rest[subcommand] != "install":
        return None
    return rest[:subcommand] + rest[subcommand + 1 :]


def parse_pip_install(step: Step, args: list[str]) -> PipInstall:
    requirements: list[Requirement] = []
    local: list[tuple[str, frozenset[str]]] = []
    options: list[tuple[str, str | None]] = []
    unparsed: list[str] = []
    words = iter(args)
    for word in words:
        if word.startswith("-"):
            option, equals, value = word.partition("=")
            if not equals and option in _PIP_VALUE_OPTIONS:
                value = next(words, "")
            options.append((option, value if (equals or option in _PIP_VALUE_OPTIONS) else None))
            continue
        path = re.fullmatch(r"(?P<path>(?:\.{1,2}|/|file:)[^\[]*)(?:\[(?P<extras>[^\]]*)\])?", word)
        if path:
            extras = frozenset(e.strip() for e in (path.group("extras") or "").split(",") if e.strip())
            local.append((path.group("path"), extras))
            continue
        try:
            requirements.append(Requirement(word))
        except InvalidRequirement:
            unparsed.append(word)
    return PipInstall(step, requirements, local, options, unparsed)


def pip_installs(dockerfile: Dockerfile) -> list[PipInstall]:
    """Every `pip install` in every stage, each stage walked with what it inherits."""
    found = []
    for stage in dockerfile.stages:
        for step, command in run_commands(dockerfile, stage):
            if step.stage is stage and (args := _pip_install_args(command)) is not None:
                found.append(parse_pip_install(step, args))
    return found


def apt_packages(dockerfile: Dockerfile, stage: Stage) -> set[str]:
    """Packages `apt-get install` / `apt install` put into `stage` or the stages under it."""
    packages = set()
    for _, command in run_commands(dockerfile, stage):
        if posixpath.basename(command[0]) in {"apt-get", "apt"} and "install" in command:
            after = command[command.index("install") + 1 :]
            packages |= {word.split("=")[0] for word in after if not word.startswith("-")}
    return packages


def created_users(dockerfile: Dockerfile, stage: Stage) -> set[str]:
    """Names given to `useradd` / `adduser` in `stage` or the stages under it."""
    value_options = {"-u", "--uid", "-g", "--gid", "-G", "--groups", "-d", "--home-dir", "--home", "-s",
                     "--shell", "-c", "--comment", "--gecos", "-k", "--skel", "-K", "--key", "-e",
                     "--expiredate", "-f", "--inactive", "-p", "--password", "--ingroup"}  # fmt: skip
    users = set()
    for _, command in run_commands(dockerfile, stage):
        if posixpath.basename(command[0]) in {"useradd", "adduser"}:
            positional, words = [], iter(command[1:])
            for word in words:
                if word in value_options:
                    next(words, None)
                elif not word.startswith("-"):
                    positional.append(word)
            users.update(positional[:1])
    return users


def symlinks(dockerfile: Dockerfile, stage: Stage) -> dict[str, str]:
    """Absolute link path -> target for each `ln -s` in `stage` or the stages under it."""
    links = {}
    for step, command in run_commands(dockerfile, stage):
        if command[0] == "ln" and any(re.fullmatch(r"-[a-zA-Z]*s[a-zA-Z]*|--symbolic", w) for w in command):
            positional = [word for word in command[1:] if not word.startswith("-")]
            if len(positional) == 2:
                target, link = positional
                links[posixpath.normpath(posixpath.join(step.workdir, link))] = target
    return links


# ---------------------------------------------------------------------------------------------
# What the project declares.


@dataclass(frozen=True)
class Project:
    declared: dict[NormalizedName, Requirement]  # dependencies and the `cuda12` extra
    cuda12_extra: set[NormalizedName]
    scripts: dict[str, str]
    package_dirs: list[str]  # repository folders the packages install from


def read_project(path: Path = PYPROJECT) -> Project:
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    project = data["project"]
    dependencies = [Requirement(r) for r in project["dependencies"]]
    cuda12 = [Requirement(r) for r in project["optional-dependencies"]["cuda12"]]
    setuptools = data["tool"]["setuptools"]
    roots = setuptools.get("package-dir", {})
    package_dirs = []
    for package in setuptools["packages"]:
        top, *rest = package.split(".")
        package_dirs.append(posixpath.normpath(posixpath.join(roots.get(top, top), *rest)))
    return Project(
        declared={canonicalize_name(r.name): r for r in dependencies + cuda12},
        cuda12_extra={canonicalize_name(r.name) for r in cuda12},
        scripts=dict(project.get("scripts", {})),
        package_dirs=package_dirs,
    )


# ---------------------------------------------------------------------------------------------
# The checks. Each returns a list of problems, empty when the Dockerfile is right.

Check = Callable[[Dockerfile, Project], list[str]]


def check_entrypoint_and_cmd(dockerfile: Dockerfile, project: Project) -> list[str]:
    """`docker run IMAGE` runs `dli train`, in exec form so signals reach the training process."""
    problems = []
    if "dli" not in project.scripts:
        problems.append("pyproject.toml declares no `dli` console script")
    for keyword, expected in (("ENTRYPOINT", ["dli"]), ("CMD", ["train"])):
        instruction = final_value(dockerfile, keyword)
        value = exec_form(instruction.args) if instruction else None
        if value != expected:
            shown = instruction.args if instruction else "nothing"
            problems.append(f"final {keyword} is {shown}, expected exec form {json.dumps(expected)}")
    return problems


def check_volumes(dockerfile: Dockerfile, project: Project) -> list[str]:
    volumes: set[str] = set()
    for step in walk(dockerfile, dockerfile.final):
        if step.instruction.keyword == "VOLUME":
            args = step.instruction.args
            volumes |= set(exec_form(args) or args.split())
    missing = {"/data", "/runs"} - {posixpath.normpath(v) for v in volumes}
    return [f"no VOLUME for {path}" for path in sorted(missing)]


def check_non_root_user(dockerfile: Dockerfile, project: Project) -> list[str]:
    instruction = final_value(dockerfile, "USER")
    if instruction is None:
        return ["the final stage runs as root: no USER"]
    user = instruction.args.split(":")[0].strip()
    if user in {"root", "0"}:
        return [f"the final stage runs as root: USER {instruction.args}"]
    if not user.isdigit() and user not in created_users(dockerfile, dockerfile.final):
        return [f"USER {user} is never created (useradd/adduser) in the final image"]
    return []


def check_cuda12_base(dockerfile: Dockerfile, project: Project) -> list[str]:
    """Every stage starts from a CUDA 12 image; the final one from a runtime flavour, not devel."""
    problems = []
    for stage in dockerfile.stages:
        if dockerfile.stage_named(stage.base, stage.index):
            continue
        image = CUDA_IMAGE.match(stage.base)
        if not image or image.group("major") != "12":
            problems.append(
                f"stage {stage.name or stage.index} starts from {stage.base}, not a CUDA 12 image"
            )
    final_root = CUDA_IMAGE.match(dockerfile.root_image(dockerfile.final))
    if final_root and "devel" in final_root.group("flavour"):
        problems.append(f"the final image is built on {final_root.group(0)}, a devel image with compilers")
    return problems


def check_installs_only_declared_packages(dockerfile: Dockerfile, project: Project) -> list[str]:
    """Packages pip installs by name are the project's (or torch's companions), at allowed versions."""
    problems = []
    for install in pip_installs(dockerfile):
        where = f"line {install.step.instruction.line}"
        problems += [f"{where}: cannot read pip argument {word!r}" for word in install.unparsed]
        requirement_files = install.option("-r", "--requirement")
        problems += [f"{where}: pip installs from {path}, names unchecked" for path in requirement_files]
        torch_from_cuda12_index = "torch" in install.names and _cuda12_index(install)
        for requirement in install.requirements:
            name = canonicalize_name(requirement.name)
            if name in TORCH_INDEX_COMPANIONS and torch_from_cuda12_index:
                continue
            declared = project.declared.get(name)
            if declared is None:
                problems.append(f"{where}: {requirement.name} is not declared in pyproject.toml")
                continue
            for pinned in _exact_versions(requirement):
                if not declared.specifier.contains(pinned, prereleases=True):
                    problems.append(f"{where}: {requirement} is outside pyproject.toml's {declared}")
    return problems


def check_installs_every_declared_package(dockerfile: Dockerfile, project: Project) -> list[str]:
    """All dependencies and the `cuda12` extra are installed by name, so the DALI and CuPy builds the
    project requires are in the image and the dependency layer does not depend on the sources."""
    installed = set().union(*(install.names for install in pip_installs(dockerfile)))
    problems = [
        f"{name} is not declared in pyproject's cuda12 extra"
        for name in CUDA12_PACKAGES - project.cuda12_extra
    ]
    problems += [
        f"{name} from pyproject.toml is not installed" for name in sorted(set(project.declared) - installed)
    ]
    problems += [f"{name} (CUDA 12 build) is not installed" for name in sorted(CUDA12_PACKAGES - installed)]
    return problems


def check_no_cuda13(dockerfile: Dockerfile, project: Project) -> list[str]:
    problems = []
    for install in pip_installs(dockerfile):
        where = f"line {install.step.instruction.line}"
        problems += [f"{where}: installs {name}" for name in sorted(install.names) if CUDA13.search(name)]
        urls = install.option("-i", "--index-url", "--extra-index-url", "-f", "--find-links")
        urls += [
            value for key, value in install.step.env.items() if key.startswith("PIP_") and "INDEX" in key
        ]
        problems += [f"{where}: uses index {url}" for url in urls if url and CUDA13.search(url)]
        extras = {extra for _, local_extras in install.local for extra in local_extras}
        problems += [
            f"{where}: installs the project's {extra} extra" for extra in extras if CUDA13.search(extra)
        ]
    return problems


def check_torch_from_cuda12_index(dockerfile: Dockerfile, project: Project) -> list[str]:
    """torch and torchvision are pinned together and come only from PyTorch's CUDA 12 index."""
    torch_installs = [install for install in pip_installs(dockerfile) if "torch" in install.names]
    if len(torch_installs) != 1:
        return [f"torch is installed by {len(torch_installs)} pip commands, expected 1"]
    install = torch_installs[0]
    problems = []
    if not _cuda12_index(install):
        indexes = install.option("-i", "--index-url") + install.option("--extra-index-url")
        problems.append(f"torch comes from {indexes or 'PyPI'}, not only a PyTorch cu12x index")
    for name in ("torch", "torchvision"):
        requirement = next((r for r in install.requirements if canonicalize_name(r.name) == name), None)
        if requirement is None or not _exact_versions(requirement):
            problems.append(f"{name} is not pinned with == in the torch install")
    return problems


def check_dependency_layers_before_sources(dockerfile: Dockerfile, project: Project) -> list[str]:
    """Dependencies install before the sources are copied; the project then installs without deps;
    the final stage takes the built environment, not the sources."""
    problems = []
    for install in pip_installs(dockerfile):
        stage, line = install.step.stage, install.step.instruction.line
        first_source_copy = next(
            (i.line for i in stage.instructions if i.keyword in {"COPY", "ADD"} and _copies_context(i)), None
        )
        copied_before = first_source_copy is not None and first_source_copy < line
        if install.requirements and copied_before:
            problems.append(
                f"line {line}: dependencies install after the sources are copied (line {first_source_copy})"
            )
        if install.local and not copied_before:
            problems.append(f"line {line}: installs the project before copying its sources")
        if install.local and not install.has_flag("--no-deps"):
            problems.append(f"line {line}: installs the project with its dependencies, not --no-deps")
    if not any(install.local for install in pip_installs(dockerfile)):
        problems.append("the project itself is never pip installed")
    for instruction in dockerfile.final.instructions:
        if instruction.keyword in {"COPY", "ADD"} and not re.search(r"--from=", instruction.args):
            problems.append(f"line {instruction.line}: the final stage copies from the build context")
    return problems


def check_no_pip_cache(dockerfile: Dockerfile, project: Project) -> list[str]:
    problems = []
    for install in pip_installs(dockerfile):
        env = install.step.env.get("PIP_NO_CACHE_DIR", "").lower()
        if not install.has_flag("--no-cache-dir") and env not in PIP_BOOLEAN_WORDS:
            problems.append(f"line {install.step.instruction.line}: pip keeps its cache in the layer")
    return problems


def check_no_build_tools_in_final_image(dockerfile: Dockerfile, project: Project) -> list[str]:
    tools = sorted(p for p in apt_packages(dockerfile, dockerfile.final) if BUILD_TOOLS.match(p))
    return [f"the final image installs build tools: {', '.join(tools)}"] if tools else []


def check_outputs_land_in_runs_volume(dockerfile: Dockerfile, project: Project) -> list[str]:
    """`dli train` writes runs/<name> relative to the working directory, and generates the synthetic
    data into DLI_CACHE: both must end up in the /runs volume, so they reach the mounted host folder."""
    problems = []
    env, workdir = final_config(dockerfile)
    runs = posixpath.join(workdir, "runs")
    link_target = symlinks(dockerfile, dockerfile.final).get(runs)
    if runs != "/runs" and not (link_target and posixpath.normpath(link_target) == "/runs"):
        problems.append(f"runs/ in the working directory {workdir} is neither /runs nor a link to it")
    cache = env.get("DLI_CACHE", "")
    if not posixpath.normpath(cache or "/").startswith("/runs/"):
        problems.append(f"DLI_CACHE is {cache or 'unset'}, not a folder in the /runs volume")
    return problems


RUNTIME_CACHES = ("CUPY_CACHE_DIR", "TRITON_CACHE_DIR")
"""Caches that CuPy (at import) and Triton (`train --compile`) create under $HOME unless these are set."""


def check_runtime_caches_in_runs_volume(dockerfile: Dockerfile, project: Project) -> list[str]:
    """With `--user $(id -u):$(id -g)` and no passwd entry, Docker sets HOME=/: CuPy's import then fails
    making /.cupy/kernel_cache (a PermissionError). Its cache and Triton's must sit in /runs."""
    env, _ = final_config(dockerfile)
    return [
        f"{name} is {env.get(name) or 'unset'}, not a folder in the /runs volume"
        for name in RUNTIME_CACHES
        if not posixpath.normpath(env.get(name) or "/").startswith("/runs/")
    ]


CHECKS: dict[str, Check] = {
    check.__name__.removeprefix("check_"): check
    for check in (
        check_entrypoint_and_cmd,
        check_volumes,
        check_non_root_user,
        check_cuda12_base,
        check_installs_only_declared_packages,
        check_installs_every_declared_package,
        check_no_cuda13,
        check_torch_from_cuda12_index,
        check_dependency_layers_before_sources,
        check_no_pip_cache,
        check_no_build_tools_in_final_image,
        check_outputs_land_in_runs_volume,
        check_runtime_caches_in_runs_volume,
    )
}


def _cuda12_index(install: PipInstall) -> bool:
    """Whether the command reads only a PyTorch CUDA 12 index (an extra index could serve CUDA 13)."""
    env = install.step.env
    index = install.option("-i", "--index-url") or ([env["PIP_INDEX_URL"]] if "PIP_INDEX_URL" in env else [])
    extra = install.option("--extra-index-url", "-f", "--find-links")
    extra += [env[key] for key in ("PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS") if env.get(key)]
    return len(index) == 1 and bool(TORCH_CUDA12_INDEX.match(index[0] or "")) and not extra


def _exact_versions(requirement: Requirement) -> list[str]:
    return [spec.version for spec in requirement.specifier if spec.operator in {"==", "==="}]


def _copies_context(instruction: Instruction) -> bool:
    """Whether a COPY/ADD takes the whole build context (`COPY . dest`)."""
    if "--from=" in instruction.args:
        return False
    words = exec_form(instruction.args) or [w for w in instruction.args.split() if not w.startswith("--")]
    return any(posixpath.normpath(source) == "." for source in words[:-1])


# ---------------------------------------------------------------------------------------------
# Tests.


@pytest.fixture(scope="module")
def project() -> Project:
    return read_project()


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))


@pytest.mark.parametrize("check", CHECKS)
def test_dockerfile_passes(check: str, dockerfile: Dockerfile, project: Project):
    assert CHECKS[check](dockerfile, project) == []


@dataclass(frozen=True)
class Mutation:
    name: str
    old: str
    new: str
    check: str


MUTATIONS = [
    Mutation("entrypoint in shell form", 'ENTRYPOINT ["dli"]', "ENTRYPOINT dli", "entrypoint_and_cmd"),
    Mutation("another default command", 'CMD ["train"]', 'CMD ["eval"]', "entrypoint_and_cmd"),
    Mutation("no /data volume", 'VOLUME ["/data", "/runs"]', 'VOLUME ["/runs"]', "volumes"),
    Mutation("no USER", "USER dli\n", "", "non_root_user"),
    Mutation("USER root", "USER dli\n", "USER root\n", "non_root_user"),
    Mutation("USER never created", "USER dli\n", "USER trainer\n", "non_root_user"),
    Mutation("CUDA 13 base", "nvidia/cuda:12.6.3-runtime", "nvidia/cuda:13.0.1-runtime", "cuda12_base"),
    Mutation("devel base", "nvidia/cuda:12.6.3-runtime", "nvidia/cuda:12.6.3-devel", "cuda12_base"),
    Mutation("plain Ubuntu base", "nvidia/cuda:12.6.3-runtime-ubuntu24.04", "ubuntu:24.04", "cuda12_base"),
    Mutation(
        "undeclared package (a dev extra)",
        '"timm==1.0.31" \\\n',
        '"timm==1.0.31" \\\n        "opencv-python-headless==4.10.0.84" \\\n',
        "installs_only_declared_packages",
    ),
    Mutation(
        "pin outside the declared range",
        '"timm==1.0.31"',
        '"timm==0.9.16"',
        "installs_only_declared_packages",
    ),
    Mutation(
        "torchvision from PyPI",
        "torch==2.14.1 torchvision==0.29.1 \\",
        "torch==2.14.1 \\\n    && pip install torchvision==0.29.1 \\",
        "installs_only_declared_packages",
    ),
    Mutation(
        "DALI left out", '        "nvidia-dali-cuda120==2.4.0" \\\n', "", "installs_every_declared_package"
    ),
    Mutation("CuPy for CUDA 13", '"cupy-cuda12x==14.2.0"', '"cupy-cuda13x==14.2.0"', "no_cuda13"),
    Mutation(
        "CuPy for CUDA 13 in place of the declared 12",
        '"cupy-cuda12x==14.2.0"',
        '"cupy-cuda13x==14.2.0"',
        "installs_every_declared_package",
    ),
    Mutation("torch from the cu130 index", "whl/cu126", "whl/cu130", "no_cuda13"),
    Mutation("torch index not a cu12x one", "whl/cu126", "whl/cu130", "torch_from_cuda12_index"),
    Mutation(
        "torch from PyPI",
        "pip install --index-url https://download.pytorch.org/whl/cu126 torch",
        "pip install torch",
        "torch_from_cuda12_index",
    ),
    Mutation(
        "extra index beside the CUDA 12 one",
        "whl/cu126 torch",
        "whl/cu126 --extra-index-url https://pypi.org/simple torch",
        "torch_from_cuda12_index",
    ),
    Mutation("torch unpinned", "torch==2.14.1 torchvision", "torch torchvision", "torch_from_cuda12_index"),
    Mutation(
        "project's cuda13 extra", "pip install --no-deps .", 'pip install --no-deps ".[cuda13]"', "no_cuda13"
    ),
    Mutation(
        "sources copied before the dependencies",
        "WORKDIR /src\n",
        "WORKDIR /src\nCOPY . .\n",
        "dependency_layers_before_sources",
    ),
    Mutation(
        "project installed with its dependencies",
        "pip install --no-deps .",
        "pip install .",
        "dependency_layers_before_sources",
    ),
    Mutation(
        "sources in the final image",
        "COPY --from=builder /opt/venv /opt/venv",
        "COPY --from=builder /opt/venv /opt/venv\nCOPY . /src",
        "dependency_layers_before_sources",
    ),
    Mutation("pip cache kept", "PIP_NO_CACHE_DIR=1 \\\n    ", "", "no_pip_cache"),
    Mutation(
        "compiler in the final image",
        "--no-install-recommends python3 \\",
        "--no-install-recommends python3 build-essential \\",
        "no_build_tools_in_final_image",
    ),
    Mutation("runs not linked", " \\\n    && ln -s /runs /workspace/runs", "", "outputs_land_in_runs_volume"),
    Mutation("workdir elsewhere", "WORKDIR /workspace", "WORKDIR /home/dli", "outputs_land_in_runs_volume"),
    Mutation(
        "cache outside /runs",
        "DLI_CACHE=/runs/.cache/dli",
        "DLI_CACHE=/tmp/dli",
        "outputs_land_in_runs_volume",
    ),
    Mutation(
        "CuPy cache under $HOME",
        " \\\n    CUPY_CACHE_DIR=/runs/.cache/cupy",
        "",
        "runtime_caches_in_runs_volume",
    ),
    Mutation(
        "Triton cache outside /runs",
        "TRITON_CACHE_DIR=/runs/.cache/triton",
        "TRITON_CACHE_DIR=/tmp/triton",
        "runtime_caches_in_runs_volume",
    ),
]


@pytest.mark.parametrize("mutation", MUTATIONS, ids=lambda m: m.name)
def test_check_catches_a_broken_dockerfile(mutation: Mutation, project: Project):
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert text.count(mutation.old) == 1, f"mutation {mutation.name!r} no longer applies to the Dockerfile"
    broken = parse_dockerfile(text.replace(mutation.old, mutation.new))
    assert CHECKS[mutation.check](broken, project), f"{mutation.check} missed: {mutation.name}"


def test_parser_joins_continuations_and_resolves_stages():
    text = (
        "# syntax=docker/dockerfile:1\n"
        "ARG CUDA=12.6.3\n"
        "FROM nvidia/cuda:${CUDA}-runtime-ubuntu24.04 AS base\n"
        "RUN pip install \\\n"
        "    # a comment inside the continuation\n"
        '        "timm==1.0.31" \\\n'
        "        numpy && echo done\n"
        "FROM base AS builder\n"
        "FROM --platform=linux/amd64 base\n"
        'ENTRYPOINT ["dli"]\n'
    )
    parsed = parse_dockerfile(text)
    assert [s.name for s in parsed.stages] == ["base", "builder", None]
    assert parsed.root_image(parsed.final) == "nvidia/cuda:12.6.3-runtime-ubuntu24.04"
    run = parsed.stages[0].instructions[0]
    assert (run.keyword, run.line) == ("RUN", 4)
    assert shell_commands(run) == [["pip", "install", "timm==1.0.31", "numpy"], ["echo", "done"]]
    assert {str(r) for r in pip_installs(parsed)[0].requirements} == {"timm==1.0.31", "numpy"}


def test_entrypoint_resets_a_cmd_inherited_from_an_earlier_stage(project: Project):
    base = 'FROM nvidia/cuda:12.6.3-base-ubuntu24.04 AS base\nCMD ["train"]\n'
    inherited = parse_dockerfile(base + 'FROM base\nENTRYPOINT ["dli"]\n')
    assert final_value(inherited, "CMD") is None
    assert check_entrypoint_and_cmd(inherited, project) == [
        'final CMD is nothing, expected exec form ["train"]'
    ]
    same_stage = parse_dockerfile(base + 'FROM base\nCMD ["train"]\nENTRYPOINT\t["dli"]\n')
    assert check_entrypoint_and_cmd(same_stage, project) == []


def test_parser_refuses_what_it_cannot_read():
    with pytest.raises(ValueError, match="heredoc"):
        parse_dockerfile("FROM nvidia/cuda:12.6.3-base-ubuntu24.04\nRUN <<EOF\npip install x\nEOF\n")
    with pytest.raises(ValueError, match="ends inside"):
        parse_dockerfile("FROM nvidia/cuda:12.6.3-base-ubuntu24.04\nRUN pip install x \\\n")


# ---------------------------------------------------------------------------------------------
# .dockerignore: a small build context that still holds everything the install needs.


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last matching pattern wins, `!` re-includes; a match covers a folder's
    contents. Patterns match whole path segments; `**` matches any number of them."""
    excluded = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        body = posixpath.normpath(pattern.removeprefix("!").strip("/"))
        wildcards = {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}
        regex = "".join(wildcards.get(part, re.escape(part)) for part in re.split(r"(\*\*/?|\*|\?)", body))
        if re.fullmatch(rf"{regex}(/.*)?", path):
            excluded = not negated
    return excluded


def test_dockerignore_keeps_the_context_small_and_complete(project: Project):
    lines = DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    for heavy in (".git", ".venv", "runs", ".pytest_cache", "tests", "pipeline/__pycache__/x.pyc"):
        assert dockerignore_excludes(patterns, heavy), f"{heavy} is sent to the Docker build"
    needed = ["pyproject.toml", "README.md", "py.typed"]
    needed += [posixpath.join(d, "__init__.py") for d in project.package_dirs]
    needed += [p.name for p in REPO.glob("*.py")]
    for path in needed:
        assert not dockerignore_excludes(patterns, posixpath.normpath(path)), (
            f"{path} is left out of the build"
        )


def test_dockerignore_matcher():
    patterns = ["**/__pycache__", "*.egg-info", "tests", "docs/*", "!docs/keep.md"]
    assert dockerignore_excludes(patterns, "__pycache__/a.pyc")
    assert dockerignore_excludes(patterns, "pipeline/__pycache__/a.pyc")
    assert dockerignore_excludes(patterns, "dli.egg-info/PKG-INFO")
    assert dockerignore_excludes(patterns, "tests/test_x.py")
    assert dockerignore_excludes(patterns, "docs/a.md")
    assert not dockerignore_excludes(patterns, "docs/keep.md")
    assert not dockerignore_excludes(patterns, "pipeline/tests.py")
    assert not dockerignore_excludes(patterns, "cli.py")
