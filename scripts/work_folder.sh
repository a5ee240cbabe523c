# Sourced by the scripts/check_*.sh checks: a temporary work folder, removed at exit unless the check's
# first argument is --keep, and `step`, which prints a step's name with the seconds since the start.
# Usage: source scripts/work_folder.sh; make_work_folder NAME "$@"  (sets WORK)

make_work_folder() {
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/rnnkern-$1.XXXXXX")
    if [[ "${2:-}" == "--keep" ]]; then
        echo "keeping $WORK"
    else
        # shellcheck disable=SC2064
        trap "rm -rf '$WORK'" EXIT
    fi
    START=$(date +%s)
}

step() { echo "== [$(( $(date +%s) - START ))s] $*"; }
