"""The engine every program shares: setup, the runner, teachers, results
and workdirs."""
