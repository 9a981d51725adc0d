"""Test-wide settings.

``local:N`` clusters read the profile that `autopar profile` writes to
~/.cache/autopar/profile.json; pointing AUTOPAR_PROFILE at a path that does not exist keeps
every test on the documented catalog fallback, whatever a developer profiled earlier. Tests
that need a profile pass one explicitly. The plan cache is kept per test session for the
same reason.
"""
import os
import tempfile

_session_dir = tempfile.mkdtemp(prefix="autopar-tests-")
os.environ["AUTOPAR_PROFILE"] = os.path.join(_session_dir, "no-profile.json")
os.environ.setdefault("AUTOPAR_CACHE_DIR", os.path.join(_session_dir, "plan-cache"))
