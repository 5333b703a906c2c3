"""Summarizes an Nsight Compute CSV (--csv --page raw, metric
gpu__time_duration.sum): kernels grouped by name, total and count, largest
first, and the total GPU time of the profiled range."""
import collections, csv, io, re, sys

text = open(sys.argv[1]).read()
# bench's own JSON line and ncu's log lines may precede the CSV header.
start = text.find('"ID"')
rows = list(csv.DictReader(io.StringIO(text[start:])))
total = collections.Counter()
count = collections.Counter()
for r in rows:
    v = r.get("gpu__time_duration.sum", "")
    try:
        ns = float(v.replace(",", ""))
    except ValueError:
        continue  # the units row
    name = r.get("Kernel Name", "?")
    name = re.sub(r"\(.*", "", name)[:110]
    total[name] += ns
    count[name] += 1
unit = rows[0].get("gpu__time_duration.sum", "") if rows else ""
scale = {"nsecond": 1e-6, "usecond": 1e-3, "msecond": 1.0}.get(unit.strip(), 1e-6)
all_ms = sum(total.values()) * scale
print(f"{sum(count.values())} kernels, {all_ms:.2f} ms GPU time in the range")
for name, ns in total.most_common(60):
    print(f"{ns * scale:9.3f} ms {100 * ns * scale / all_ms:5.1f}% {count[name]:6d}  {name}")
