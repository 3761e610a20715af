/* `sleep SECONDS` for an image without a shell: what the plain-sidecar variant's preStop hook runs
 * (deploy/kubernetes/plain-sidecar) on clusters whose kubelet has no built-in sleep action.
 * Built static with musl-gcc into the image (deploy/Dockerfile). */
#include <errno.h>
#include <stdlib.h>
#include <time.h>

int main(int argc, char **argv) {
    char *end;
    long seconds;
    struct timespec left;

    if (argc != 2)
        return 2;
    errno = 0;
    seconds = strtol(argv[1], &end, 10);
    if (errno != 0 || end == argv[1] || *end != '\0' || seconds < 0)
        return 2;
    left.tv_sec = seconds;
    left.tv_nsec = 0;
    while (nanosleep(&left, &left) == -1)
        if (errno != EINTR)
            return 1;
    return 0;
}
