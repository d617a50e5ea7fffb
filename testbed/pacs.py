"""A throwaway Orthanc PACS with helpers for its REST API (stdlib only)."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any, cast

from testbed.dirs import claim_base_dir, release_base_dir
from testbed.ports import LOOPBACK, free_ports, port_listening, wait_until
from testbed.process import terminate_session

DEFAULT_AET = "PRACTICEPACS"

# Orthanc 1.10 has no bind-address option and listens on all interfaces.
# HTTP is confined to loopback by RemoteAccessAllowed=false; this filter
# does the same for C-STORE, the only DICOM service open to unknown peers.
_LOOPBACK_ONLY_LUA = """\
function ReceivedInstanceFilter(dicom, origin, info)
  return origin["RequestOrigin"] ~= "DicomProtocol"
      or string.sub(origin["RemoteIp"] or "", 1, 4) == "127."
end
"""


class Pacs:
    """Orthanc in the foreground as a child process, storage in *base_dir*.

    stop() keeps the storage, so start() afterwards brings back the same
    PACS (same ports, same instances); close() also removes the files.
    """

    host = LOOPBACK

    def __init__(
        self,
        base_dir: Path | None = None,
        *,
        aet: str = DEFAULT_AET,
        startup_timeout: float = 30.0,
    ) -> None:
        if not 0 < len(aet) <= 16:
            raise ValueError(f"AE title must have 1 to 16 characters: {aet!r}")
        self.base_dir, self._created_base = claim_base_dir(base_dir, "testbed-pacs-")
        self.aet = aet
        self.startup_timeout = startup_timeout
        self.dicom_port, self.http_port = free_ports(2)
        self.url = f"http://{self.host}:{self.http_port}"
        self.config_file = self.base_dir / "orthanc.json"
        self.log_file = self.base_dir / "orthanc.log"
        self._process: subprocess.Popen[bytes] | None = None

    # -- lifecycle -----------------------------------------------------

    @property
    def pid(self) -> int | None:
        """Pid of the running Orthanc, if any."""
        if self._process is None or self._process.poll() is not None:
            return None
        return self._process.pid

    def write_config(self) -> None:
        """Write orthanc.json and the Lua filter."""
        self.base_dir.mkdir(parents=True, exist_ok=True)
        lua = self.base_dir / "loopback-only.lua"
        lua.write_text(_LOOPBACK_ONLY_LUA)
        config = {
            "Name": "dicommail-testbed",
            "StorageDirectory": str(self.base_dir / "storage"),
            "IndexDirectory": str(self.base_dir / "index"),
            "StorageCompression": False,
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "UnknownSopClassAccepted": True,
            # dicommail's receiver (calling AE title DICOMMAIL) may also query
            # (C-FIND, its in-flight check), from loopback only.
            "DicomModalities": {"dicommail": {"AET": "DICOMMAIL", "Host": LOOPBACK, "Port": 104}},
            "DicomCheckModalityHost": True,
            "Plugins": [],
            "LuaScripts": [str(lua)],
            # Jobs and thread pools sized for a test, not a hospital.
            "SaveJobs": False,
            "HttpThreadsCount": 8,
            "DicomThreadsCount": 2,
        }
        self.config_file.write_text(json.dumps(config, indent=2))

    def start(self) -> None:
        """Start Orthanc and wait until DICOM and REST both answer."""
        if self.pid is not None:
            return
        self.write_config()
        with self.log_file.open("ab") as log:
            self._process = subprocess.Popen(
                ["Orthanc", str(self.config_file)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.base_dir,
                # Own session: a Ctrl-C meant for the test runner must not
                # kill the PACS behind the fixture's back.
                start_new_session=True,
            )
        try:
            wait_until(
                lambda: port_listening(self.dicom_port) and self._rest_ready(),
                what="Orthanc",
                timeout=self.startup_timeout,
                log=self.log_file,
                alive=lambda: self.pid is not None,
            )
        except BaseException:
            self.stop()
            raise

    def _rest_ready(self) -> bool:
        try:
            self.get_json("/system")
        except (OSError, ValueError):
            return False
        return True

    def stop(self, timeout: float = 15.0, *, graceful: bool = True) -> None:
        """Stop Orthanc; storage is kept.

        Graceful (SIGTERM) takes about 3.5 s, as Orthanc drains its HTTP and
        DICOM servers; otherwise SIGKILL, like a crash or power cut.
        """
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            terminate_session(process.pid, timeout, graceful=graceful)
        process.wait(timeout=5)

    def restart(self) -> None:
        """Stop and start Orthanc with the same ports and storage."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Kill Orthanc and remove its files."""
        self.stop(graceful=False)
        release_base_dir(self.base_dir, self._created_base)

    def __enter__(self) -> Pacs:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable summary: host, ports, AE title, URL, paths, pid."""
        return {
            "host": self.host,
            "aet": self.aet,
            "dicom_port": self.dicom_port,
            "http_port": self.http_port,
            "url": self.url,
            "base_dir": str(self.base_dir),
            "log": str(self.log_file),
            "pid": self.pid,
        }

    # -- REST helpers ----------------------------------------------------

    def _request(self, path: str, *, method: str = "GET", data: bytes | None = None) -> bytes:
        request = urllib.request.Request(self.url + path, data=data, method=method)
        with urllib.request.urlopen(request, timeout=10) as response:
            return cast(bytes, response.read())

    def get_json(self, path: str) -> Any:
        """GET *path* (e.g. "/instances") and decode the JSON answer."""
        return json.loads(self._request(path))

    def list_sop_instance_uids(self) -> list[str]:
        """SOP Instance UIDs of every stored instance."""
        instances = self.get_json("/instances?expand")
        return [i["MainDicomTags"]["SOPInstanceUID"] for i in instances]

    def find_instance(self, sop_instance_uid: str) -> str | None:
        """Orthanc's id of the instance with this SOP Instance UID, if stored."""
        matches = json.loads(self._request("/tools/lookup", method="POST", data=sop_instance_uid.encode()))
        for match in matches:
            if match["Type"] == "Instance":
                return cast(str, match["ID"])
        return None

    def _instance_id(self, sop_instance_uid: str) -> str:
        instance_id = self.find_instance(sop_instance_uid)
        if instance_id is None:
            raise KeyError(f"no instance with SOP Instance UID {sop_instance_uid}")
        return instance_id

    def get_instance_tags(self, sop_instance_uid: str) -> dict[str, Any]:
        """The instance's tags as Orthanc's simplified name → value mapping."""
        tags = self.get_json(f"/instances/{self._instance_id(sop_instance_uid)}/simplified-tags")
        return cast(dict[str, Any], tags)

    def get_instance_file(self, sop_instance_uid: str) -> bytes:
        """The stored DICOM file (Part 10 bytes) of an instance."""
        return self._request(f"/instances/{self._instance_id(sop_instance_uid)}/file")

    def wait_for_instance(self, sop_instance_uid: str, timeout: float = 10.0) -> str:
        """Poll until the instance is stored; return its Orthanc id."""
        deadline = time.monotonic() + timeout
        while True:
            instance_id = self.find_instance(sop_instance_uid)
            if instance_id is not None:
                return instance_id
            if time.monotonic() > deadline:
                raise TimeoutError(f"instance {sop_instance_uid} not stored after {timeout}s")
            time.sleep(0.1)

    def delete_all_instances(self) -> None:
        """Remove every stored study (to isolate tests sharing one PACS)."""
        for patient in self.get_json("/patients"):
            self._request(f"/patients/{patient}", method="DELETE")
