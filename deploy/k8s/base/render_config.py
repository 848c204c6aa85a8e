"""render_config.py SRC DST: write the serve config SRC to DST with each ${NAME} replaced by the environment
variable NAME (the pod gets them from the Secret lorafleet-secrets). Runs as the init container of the gateway
and worker pods, before `lorafleet serve` / `lorafleet worker` read DST. A variable that is not set stops the
pod with an error naming it; `$$` is a literal dollar sign."""

import os
import string
import sys


def main(src: str, dst: str) -> int:
    with open(src) as f:
        text = f.read()
    try:
        out = string.Template(text).substitute(os.environ)
    except KeyError as e:
        print(f"{src}: ${{{e.args[0]}}} is not set (add it to the Secret lorafleet-secrets)", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"{src}: {e} (write a literal dollar sign as $$)", file=sys.stderr)
        return 1
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it holds the Secret's values
    with os.fdopen(fd, "w") as f:
        f.write(out)
    print(f"wrote {dst}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1], sys.argv[2]))
