"""One line per profiled launch of an `ncu` text report (scripts/gpu_run.sh's OPSQ_NCU=1 run of
scripts/ncu_case.py, sections SpeedOfLight, ComputeWorkloadAnalysis, WarpStateStats,
InstructionStats, LaunchStats, Occupancy): duration (us), DRAM and SM throughput (% of peak),
issue slots busy (%), executed IPC, achieved occupancy (%), registers a thread, elapsed and
SM-active cycles (SM-active is the mean over all SMs), warp cycles per issued instruction,
executed instructions, and active% = SM-active / elapsed cycles (low: launch, ramp or tail
time, or a grid on few SMs).

    python3 scripts/ncu_digest.py ncu.log > ncu_digest.txt
"""
import re
import sys

# the report's metric name -> the column it fills (first occurrence per launch)
COLUMNS = {"Duration": "us", "DRAM Throughput": "dram", "Compute (SM) Throughput": "sm",
           "Issue Slots Busy": "issue", "Executed Ipc Active": "ipc",
           "Achieved Occupancy": "occ", "Registers Per Thread": "regs",
           "Elapsed Cycles": "elapsed", "SM Active Cycles": "active",
           "Warp Cycles Per Issued Instruction": "cpi", "Executed Instructions": "inst"}
ORDER = ["us", "dram", "sm", "issue", "ipc", "occ", "regs", "elapsed", "active", "cpi", "inst"]
LAUNCH = re.compile(r"\s+(?:void )?(?:\(anonymous namespace\)::|unnamed>::)?(\w+)(<[^(]*>)?\(.*\) "
                    r"\((\d+), (\d+), (\d+)\)x\((\d+), (\d+), (\d+)\), Context")
METRIC = re.compile(r"\s+(.+?)\s{2,}(?:(\S+)\s+)?([\d,.]+)$")
TO_US = {"ns": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3, "s": 1e6}


def parse(lines):
    launches, cur = [], None
    for line in lines:
        m = LAUNCH.match(line)
        if m:
            grid = int(m.group(3)) * int(m.group(4)) * int(m.group(5))
            block = int(m.group(6)) * int(m.group(7)) * int(m.group(8))
            cur = {"kernel": m.group(1) + (m.group(2) or ""), "grid": f"{grid}x{block}"}
            launches.append(cur)
            continue
        mm = METRIC.match(line) if cur is not None else None
        if mm and mm.group(1) in COLUMNS and COLUMNS[mm.group(1)] not in cur:
            value = mm.group(3).replace(",", "")
            if mm.group(1) == "Duration":  # the report picks ns / us / ms per launch
                value = f"{float(value) * TO_US.get(mm.group(2), float('nan')):.2f}"
            cur[COLUMNS[mm.group(1)]] = value
    return launches


def main(path):
    with open(path, errors="replace") as f:
        launches = parse(f.read().splitlines())
    print(f"{'#':>2} {'kernel':<52} {'grid':>10} " + " ".join(f"{c:>9}" for c in ORDER)
          + "  active%")
    for i, r in enumerate(launches):
        try:
            act = f"{100 * float(r['active']) / float(r['elapsed']):7.1f}"
        except (KeyError, ValueError, ZeroDivisionError):
            act = "      -"
        print(f"{i:>2} {r['kernel'][:52]:<52} {r['grid']:>10} "
              + " ".join(f"{r.get(c, '-'):>9}" for c in ORDER) + f"  {act}")


if __name__ == "__main__":
    main(sys.argv[1])
