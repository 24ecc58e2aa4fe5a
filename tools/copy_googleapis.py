"""Copy the google/api and google/rpc protos the contract imports out of the installed
googleapis-common-protos package into a buf module (the BSR is unreachable offline)."""

import shutil
import sys
from pathlib import Path

import google.api
import google.rpc

FILES = {
    google.api: ["annotations.proto", "field_behavior.proto", "http.proto", "httpbody.proto"],
    google.rpc: ["status.proto", "error_details.proto", "code.proto"],
}


def copy(dest: Path) -> None:
    for package, names in FILES.items():
        source = Path(next(iter(package.__path__)))
        target = dest / "google" / source.name
        target.mkdir(parents=True, exist_ok=True)
        for name in names:
            shutil.copyfile(source / name, target / name)


if __name__ == "__main__":
    copy(Path(sys.argv[1]))
