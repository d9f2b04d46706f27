"""grading_cli: grade a whole class of course notebooks safely and in parallel (``python -m grading_cli``).

nbgrader owns the release and the gradebook (max scores, test sources with hidden tests); this package does
the per-submission work and keeps one writer:

``collect``  submissions in the layouts instructors get (folders, a zip, flat LMS downloads);
``repair``   match a learner's notebook back to the released one (metadata, copies, order, deletions);
``execute``  run it in a scratch folder through ``sandbox.py`` (namespaces, nobody, rlimits, time limits);
``score``    score test cells (errors only), split hidden tests off, build feedback without them;
``task``     one (student, assignment) Dask task: plain data in, plain results out;
``driver``   fan-out on Dask; the only process that writes the gradebook, feedback and grades.csv;
``report``   report.md. course_lib knows nothing of this package; the kernels only import course_lib.
"""
