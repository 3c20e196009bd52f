"""The streaming students benchmark (`python -m bench.students --protocol stream`):
students measured as production runs them, against a teacher the side trainer keeps fresh.

    config.py    what a run is (the weights and temperature fixed before any result)
    world.py     the synthetic world, its planted-probability sidecar, the student's rows
    teacher.py   the FM in time order and its knowledge, by the side trainer's gate path
    student.py   a student streaming the late shards (progressive validation), the tuning
    stats.py     paired differences over seeds: mean, 95 % interval, sign count
    report.py    tables, targets, JSON and PNG
    run.py       one run over the seeds; `main`
"""
