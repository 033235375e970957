# Shell helpers the experiment drivers share; source it after setting TIMES (a .tsv of wall
# times) and RUNS (the folder holding one sub-folder of run directories per dataset or study).

timed() {  # timed LABEL CMD...: run CMD, append its wall time to $TIMES
  local label=$1 start end
  shift
  echo "+ $*"
  start=$(date +%s)
  "$@"
  end=$(date +%s)
  printf '%s\t%s\t%s\n' "$label" "$((end - start))" "$(date -u +%FT%TZ)" >>"$TIMES"
}

run_dir() { ls -d "$RUNS/$1/$2"-2* 2>/dev/null | tail -n 1 || true; }  # run_dir FOLDER NAME
