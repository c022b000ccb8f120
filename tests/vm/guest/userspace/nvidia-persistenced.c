/*
 * nvidia-persistenced stand-in for nvidia-agent's QEMU guest tests (test
 * code, not NVIDIA's). Like the real daemon it holds /dev/nvidiactl open
 * while it runs (so `rmmod nvidia` is refused until it stops), writes
 * /run/nvidia-persistenced/nvidia-persistenced.pid, forks into the
 * background unless --foreground/-f is given (systemd Type=forking with
 * PIDFile= works), and exits 0 on SIGTERM or SIGINT after removing the pid
 * file. It fails (exit 1) when /dev/nvidiactl cannot be opened.
 * Accepted and ignored: --user, --group (with a value), --verbose,
 * --persistence-mode, --no-persistence-mode.
 */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define PID_DIR "/run/nvidia-persistenced"
#define PID_FILE PID_DIR "/nvidia-persistenced.pid"

static volatile sig_atomic_t stop;

static void on_signal(int sig)
{
	(void)sig;
	stop = 1;
}

static int write_pid_file(void)
{
	FILE *f;

	if (mkdir(PID_DIR, 0755) != 0 && errno != EEXIST)
		return -1;
	f = fopen(PID_FILE, "w");
	if (!f)
		return -1;
	fprintf(f, "%d\n", (int)getpid());
	return fclose(f);
}

/* A daemon keeps no terminal: stdio to /dev/null where it can be opened. */
static void detach_stdio(void)
{
	int null = open("/dev/null", O_RDWR | O_CLOEXEC);

	if (null < 0)
		return;
	dup2(null, STDIN_FILENO);
	dup2(null, STDOUT_FILENO);
	dup2(null, STDERR_FILENO);
	close(null);
}

int main(int argc, char **argv)
{
	int foreground = 0, i, fd, ready[2];
	struct sigaction sa;
	sigset_t block, old;
	char ok = 0;

	for (i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "-f") || !strcmp(argv[i], "--foreground"))
			foreground = 1;
		else if (!strcmp(argv[i], "--user") || !strcmp(argv[i], "-u") || !strcmp(argv[i], "--group"))
			i++;
		else if (strncmp(argv[i], "--user=", 7) && strncmp(argv[i], "--group=", 8) &&
			 strcmp(argv[i], "--verbose") && strcmp(argv[i], "-V") &&
			 strcmp(argv[i], "--persistence-mode") && strcmp(argv[i], "--no-persistence-mode")) {
			fprintf(stderr, "nvidia-persistenced (stand-in): unknown option %s\n", argv[i]);
			return 1;
		}
	}
	fd = open("/dev/nvidiactl", O_RDWR | O_CLOEXEC);
	if (fd < 0) {
		fprintf(stderr, "nvidia-persistenced failed to initialize: /dev/nvidiactl: %s\n", strerror(errno));
		return 1;
	}
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_signal;
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	sigemptyset(&block);
	sigaddset(&block, SIGTERM);
	sigaddset(&block, SIGINT);
	sigprocmask(SIG_BLOCK, &block, &old);

	if (!foreground) {
		pid_t pid;

		if (pipe(ready) != 0)
			return 1;
		pid = fork();
		if (pid < 0)
			return 1;
		if (pid > 0) {
			/* The parent exits once the daemon's pid file exists (Type=forking). */
			close(ready[1]);
			if (read(ready[0], &ok, 1) != 1)
				ok = 0;
			return ok ? 0 : 1;
		}
		close(ready[0]);
		setsid();
	}
	if (write_pid_file() != 0) {
		fprintf(stderr, "nvidia-persistenced: cannot write %s: %s\n", PID_FILE, strerror(errno));
		return 1;
	}
	if (!foreground) {
		ok = 1;
		if (write(ready[1], &ok, 1) != 1)
			return 1;
		close(ready[1]);
		detach_stdio();
	}
	fprintf(stderr, "nvidia-persistenced (stand-in) started, pid %d\n", (int)getpid());
	while (!stop)
		sigsuspend(&old);
	unlink(PID_FILE);
	close(fd);
	return 0;
}
