# Sourced by scripts/*.sh: create .venv if missing and (re)install the project when pyproject.toml
# changed since the last install. $1 = extras to install ("" for none).
ensure_venv() {
    local extras="${1:-}"
    local py="${PYTHON:-python3}"
    if [ ! -x .venv/bin/python ]; then
        echo "== creating .venv"
        "$py" -m venv .venv
    fi
    local spec="."
    [ -n "$extras" ] && spec=".[${extras}]"
    local stamp=".venv/.kici-installed-${extras:-base}"
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        echo "== installing kici ${spec}"
        .venv/bin/python -m pip install -q --upgrade pip
        .venv/bin/python -m pip install -q -e "$spec"
        touch "$stamp"
    fi
}
