/*
 * pgturso.so: Postgres runs the pgturso worker.
 *
 * Loaded with shared_preload_libraries = 'pgturso'. For every entry of pgturso.database ("db" for the
 * database's default target, "db/target" for a named one) it registers one background worker, which
 * runs the Python worker (python3 -m pgturso run) as a child process and supervises it:
 *
 *  - The child is exec'd, never run inside this process: a crash of Python, or of a native module it loads,
 *    kills only the child. This worker logs how the child ended and starts it again after
 *    pgturso.restart_delay; it never dies by a signal itself and exits only with 1 (which the postmaster
 *    answers by restarting it), so a crashed worker never makes Postgres reinitialize.
 *  - The child's stdout and stderr come back through a pipe and are written to the server log line by line
 *    with ereport, so they carry the server's log_line_prefix.
 *  - SIGHUP (pg_reload_conf()) is forwarded to the child, which reads its settings again.
 *  - SIGTERM (fast shutdown, or pg_terminate_backend): the child gets SIGTERM, then SIGKILL after
 *    STOP_GRACE_MS; this worker waits for it so that no process outlives the server. Whenever the child
 *    ends, its process group is killed before it is reaped, so nothing it started outlives it either.
 *  - SIGQUIT (crash-restart, immediate shutdown): the child's process group gets SIGKILL, then this worker
 *    exits at once as Postgres' own handler does; no deliverer outlives the crashed server.
 *  - ProcSignal barriers (DROP DATABASE, DROP TABLESPACE wait for every process to absorb them) are
 *    absorbed in the main loop.
 *  - Smart shutdown: the child's connection counts as a client, and smart shutdown waits for clients. The
 *    postmaster marks postmaster.pid "stopping"; this worker checks that once a second and then stops the
 *    child (and does not start it again), so that smart shutdown completes.
 *
 * Everything about delivery lives in the Python package; this file only starts, watches and stops it.
 */
#include "postgres.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include "fmgr.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "postmaster/postmaster.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/procsignal.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/pidfile.h"
#include "utils/timestamp.h"
#include "utils/varlena.h"

PG_MODULE_MAGIC;

void		_PG_init(void);
PGDLLEXPORT void pgturso_worker_main(Datum main_arg);

/* How long the child may take to stop on SIGTERM before it is killed: fast shutdown stays under 1 s. */
#define STOP_GRACE_MS 500
/* pgturso-worker's exit code for a problem retrying cannot fix: retried after a reload, or this late. */
#define EXIT_FATAL 2
#define FATAL_RETRY_SECONDS 60
/* The postmaster restarts this worker this long after it exited 1. */
#define WORKER_RESTART_SECONDS 5
/* A child that keeps failing within this long (say, python3 lacks psycopg) is restarted ever later, up to
 * MAX_RESTART_SECONDS: a few log lines, not one every few seconds. */
#define QUICK_FAILURE_SECONDS 30
#define MAX_RESTART_SECONDS 300

static char *pgturso_database = NULL;
static bool pgturso_enabled = true;
static char *pgturso_python = NULL;
static char *pgturso_role = NULL;
static int	pgturso_restart_delay = 5;

static volatile sig_atomic_t got_sigterm = false;

/* The child: its pid (also its process group), the read end of its output pipe, and unfinished output. */
static volatile pid_t child_pid = 0;
static TimestampTz child_started_at = 0;
static int	quick_failures = 0;
static int	child_output = -1;
static char output_line[8192];
static int	output_len = 0;

/* Which (database, target) this worker delivers, for log lines and pg_stat_activity. */
static char worker_database[NAMEDATALEN];
static char worker_target[NAMEDATALEN];

/*
 * Copy src into dst (size bytes), cut if it does not fit before the character that would not fit whole
 * (UTF-8): a name cut inside a character made pg_stat_activity unreadable to clients that decode strictly.
 * The postmaster and this worker know no database encoding to clip by.
 */
static void
copy_clipped(char *dst, size_t size, const char *src)
{
	size_t		len = strlen(src);

	if (len >= size)
	{
		len = size - 1;
		while (len > 0 && ((unsigned char) src[len] & 0xC0) == 0x80)
			len--;
	}
	memcpy(dst, src, len);
	dst[len] = '\0';
}

/*
 * Split one entry of pgturso.database: "db" (the default target) or "db/target" (a named target, as created
 * by pgturso.add_target). The last '/' separates them. Returns false (with a reason) for a malformed entry.
 */
static bool
split_entry(const char *entry, char *database, char *target, const char **reason)
{
	const char *slash = strrchr(entry, '/');
	size_t		db_len = slash ? (size_t) (slash - entry) : strlen(entry);
	const char *tgt = slash ? slash + 1 : "default";

	if (db_len == 0 || *tgt == '\0')
	{
		*reason = "an entry is \"database\" or \"database/target\"";
		return false;
	}
	if (db_len >= NAMEDATALEN || strlen(tgt) >= NAMEDATALEN)
	{
		*reason = "a database or target name is too long";
		return false;
	}
	memcpy(database, entry, db_len);
	database[db_len] = '\0';
	strcpy(target, tgt);
	return true;
}

/* The entries of pgturso.database, or false with a reason; used by the check hook and at registration. */
static bool
parse_databases(const char *value, List **entries, const char **reason)
{
	char	   *copy = pstrdup(value ? value : "");
	ListCell   *lc;
	char		database[NAMEDATALEN];
	char		target[NAMEDATALEN];

	if (!SplitGUCList(copy, ',', entries))
	{
		*reason = "it is a comma-separated list (quote names with double quotes)";
		return false;
	}
	foreach(lc, *entries)
	{
		if (!split_entry((const char *) lfirst(lc), database, target, reason))
			return false;
	}
	return true;
}

static bool
check_database(char **newval, void **extra, GucSource source)
{
	List	   *entries = NIL;
	const char *reason = NULL;

	if (!parse_databases(*newval, &entries, &reason))
	{
		GUC_check_errdetail("%s", reason);
		return false;
	}
	return true;
}

void
_PG_init(void)
{
	List	   *entries = NIL;
	const char *reason = NULL;
	ListCell   *lc;
	int			index = 0;

	/* The workers can only be registered at server start; loaded any other way this library does nothing. */
	if (!process_shared_preload_libraries_in_progress)
		return;

	DefineCustomStringVariable("pgturso.database",
							   "Databases the background workers deliver from: \"db\" or \"db/target\", comma-separated.",
							   "One background worker per entry; empty: none. Changing it needs a restart.",
							   &pgturso_database, "", PGC_POSTMASTER, 0, check_database, NULL, NULL);
	DefineCustomBoolVariable("pgturso.enabled",
							 "Whether the background workers run the Python worker.",
							 "Off stops the workers' Python processes until it is turned on again (reload).",
							 &pgturso_enabled, true, PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomStringVariable("pgturso.python",
							   "Python interpreter the background workers run pgturso with.",
							   "The package comes from the extension's directory; the interpreter supplies its dependencies.",
							   &pgturso_python, "/usr/bin/python3", PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomStringVariable("pgturso.role",
							   "Role the background workers connect as (empty: the server's operating system user).",
							   NULL, &pgturso_role, "", PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("pgturso.restart_delay",
							"Seconds before a background worker starts its Python process again after it ended.",
							NULL, &pgturso_restart_delay, 5, 1, 3600, PGC_SIGHUP, GUC_UNIT_S,
							NULL, NULL, NULL);

	if (!parse_databases(pgturso_database, &entries, &reason))
		return;					/* check_database refused it already */

	/*
	 * Each entry takes one of max_worker_processes, which parallel query and logical replication share.
	 * Beyond them, say so once, naming the first entry left without a worker (Postgres would log a line
	 * per entry that names none), and leave one for the logical replication launcher.
	 */
	if (list_length(entries) >= max_worker_processes)
		ereport(WARNING,
				(errmsg("pgturso.database lists %d entries, but max_worker_processes is %d",
						list_length(entries), max_worker_processes),
				 errdetail("Entries from \"%s\" on get no background worker, and parallel query and logical "
						   "replication get none either.",
						   (const char *) list_nth(entries, Max(max_worker_processes - 1, 0))),
				 errhint("Raise max_worker_processes (a restart) above the number of entries plus what "
						 "parallel query and logical replication need.")));

	foreach(lc, entries)
	{
		BackgroundWorker worker;
		char		name[3 * NAMEDATALEN];

		if (index >= max_worker_processes - 1)
			break;
		memset(&worker, 0, sizeof(worker));
		/* A connection to no database: enough to show in pg_stat_activity, and a missing database is fine. */
		worker.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
		worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
		worker.bgw_restart_time = WORKER_RESTART_SECONDS;
		snprintf(worker.bgw_library_name, BGW_MAXLEN, "pgturso");
		snprintf(worker.bgw_function_name, BGW_MAXLEN, "pgturso_worker_main");
		snprintf(name, sizeof(name), "pgturso worker %s", (const char *) lfirst(lc));
		copy_clipped(worker.bgw_name, BGW_MAXLEN, name);
		snprintf(worker.bgw_type, BGW_MAXLEN, "pgturso worker");
		worker.bgw_main_arg = Int32GetDatum(index++);
		RegisterBackgroundWorker(&worker);
	}
}

static void
handle_sigterm(SIGNAL_ARGS)
{
	int			save_errno = errno;

	got_sigterm = true;
	SetLatch(MyLatch);
	errno = save_errno;
}

/*
 * SIGQUIT: the postmaster's crash-restart or immediate shutdown. Like Postgres' own handler, exit at once
 * without cleanup; first SIGKILL the child's process group. PR_SET_PDEATHSIG reaches only the child: a
 * process it started (pgturso.python being a script that runs Python without exec'ing it) would live on,
 * and deliver alongside the next child after the restart.
 */
static void
handle_sigquit(SIGNAL_ARGS)
{
	pid_t		pid = child_pid;

	if (pid != 0)
		kill(-pid, SIGKILL);
	_exit(2);
}

static void
handle_sigchld(SIGNAL_ARGS)
{
	int			save_errno = errno;

	SetLatch(MyLatch);
	errno = save_errno;
}

/* True once the postmaster has begun any shutdown (postmaster.pid says "stopping"). */
static bool
server_stopping(void)
{
	char		contents[1024];
	int			fd = open("postmaster.pid", O_RDONLY, 0);	/* our working directory is the data directory */
	ssize_t		len;
	char	   *line = contents;
	int			lineno;

	if (fd < 0)
		return false;
	len = read(fd, contents, sizeof(contents) - 1);
	close(fd);
	if (len <= 0)
		return false;
	contents[len] = '\0';
	for (lineno = 1; lineno < LOCK_FILE_LINE_PM_STATUS && line != NULL; lineno++)
	{
		line = strchr(line, '\n');
		if (line != NULL)
			line++;
	}
	return line != NULL && strncmp(line, PM_STATUS_STOPPING, strlen(PM_STATUS_STOPPING)) == 0;
}

static void
emit_output_line(void)
{
	output_line[output_len] = '\0';
	if (output_len > 0)
		ereport(LOG,
				(errmsg_internal("pgturso %s/%s: %s", worker_database, worker_target, output_line),
				 errhidestmt(true), errhidecontext(true)));
	output_len = 0;
}

/* Read what the child wrote and log each complete line; at end of file, close the pipe. */
static void
read_child_output(void)
{
	char		buffer[4096];

	while (child_output >= 0)
	{
		ssize_t		n = read(child_output, buffer, sizeof(buffer));
		ssize_t		i;

		if (n < 0 && (errno == EAGAIN || errno == EINTR))
			return;
		if (n <= 0)
		{
			emit_output_line();
			close(child_output);
			child_output = -1;
			return;
		}
		for (i = 0; i < n; i++)
		{
			if (buffer[i] == '\n')
				emit_output_line();
			else
			{
				output_line[output_len++] = buffer[i];
				if (output_len == (int) sizeof(output_line) - 1)
					emit_output_line();
			}
		}
	}
}

/* Log how the child ended; returns the delay in seconds before starting it again. */
static int
child_ended(int status)
{
	int			delay = pgturso_restart_delay;

	read_child_output();
	child_pid = 0;
	if (WIFEXITED(status) && WEXITSTATUS(status) == 0)
	{
		/* It stopped by itself, as after a reload that changed its settings: start it again. */
		quick_failures = 0;
		ereport(LOG, (errmsg("pgturso %s/%s: the Python worker stopped; starting it again in %d s",
							 worker_database, worker_target, delay)));
		return delay;
	}
	if (TimestampDifferenceExceeds(child_started_at, GetCurrentTimestamp(), QUICK_FAILURE_SECONDS * 1000))
		quick_failures = 0;
	else if (quick_failures < 16)
		quick_failures++;
	if (quick_failures > 1)
		delay = Min((long) delay << (quick_failures - 1), MAX_RESTART_SECONDS);
	if (WIFSIGNALED(status))
		ereport(LOG,
				(errmsg("pgturso %s/%s: the Python worker was terminated by signal %d: %s",
						worker_database, worker_target, WTERMSIG(status), pg_strsignal(WTERMSIG(status))),
				 errdetail("Delivery resumes where it stopped (it is exactly-once); restarting it in %d s.",
						   delay)));
	else if (WEXITSTATUS(status) == EXIT_FATAL)
	{
		delay = Max(delay, FATAL_RETRY_SECONDS);
		ereport(LOG,
				(errmsg("pgturso %s/%s: the Python worker stopped on a problem that retrying cannot fix",
						worker_database, worker_target),
				 errhint("Its last lines above name the problem. Fix it and run SELECT pg_reload_conf(); "
						 "it is also retried in %d s.", delay)));
	}
	else
		ereport(LOG,
				(errmsg("pgturso %s/%s: the Python worker exited with code %d; restarting it in %d s",
						worker_database, worker_target, WEXITSTATUS(status), delay)));
	return delay;
}

/* Whether the child has ended; it stays unreaped (a zombie), so its pid, the group's id, cannot be reused. */
static bool
child_exited(void)
{
	siginfo_t	info;

	memset(&info, 0, sizeof(info));
	return waitid(P_PID, child_pid, &info, WEXITED | WNOHANG | WNOWAIT) == 0 && info.si_pid == child_pid;
}

/*
 * SIGKILL to the child's process group (anything it started is in it: without this, a process started by a
 * pgturso.python script would outlive it and deliver alongside the next child), then reap the child. Only
 * in this order: once reaped, its pid may be reused, and so may the group id.
 */
static int
end_group_and_reap(void)
{
	int			status = 0;

	kill(-child_pid, SIGKILL);
	while (waitpid(child_pid, &status, 0) < 0 && errno == EINTR)
		;
	return status;
}

/* Reap the child if it ended; returns the restart delay then, -1 while it runs (or there is none). */
static int
reap_child(void)
{
	if (child_pid == 0 || !child_exited())
		return -1;
	return child_ended(end_group_and_reap());
}

/* SIGTERM to the child's process group, SIGKILL after STOP_GRACE_MS; returns when the child is gone. */
static void
stop_child(void)
{
	int			waited_ms = 0;

	if (child_pid == 0)
		return;
	kill(-child_pid, SIGTERM);
	while (!child_exited() && waited_ms < STOP_GRACE_MS)
	{
		read_child_output();
		pg_usleep(10 * 1000L);
		waited_ms += 10;
	}
	end_group_and_reap();
	read_child_output();
	child_pid = 0;
}

/* The first Unix socket directory, or localhost when the server listens on none. Computed once (the
 * setting needs a restart), so that starting the child again and again allocates nothing. */
static const char *
server_host(void)
{
	static const char *host = NULL;
	char	   *copy;
	List	   *dirs = NIL;

	if (host != NULL)
		return host;
	copy = MemoryContextStrdup(TopMemoryContext, Unix_socket_directories ? Unix_socket_directories : "");
	if (SplitDirectoriesString(copy, ',', &dirs) && dirs != NIL)
		host = MemoryContextStrdup(TopMemoryContext, (const char *) linitial(dirs));
	else
		host = "localhost";
	list_free_deep(dirs);
	pfree(copy);
	return host;
}

static void
start_child(void)
{
	int			pipe_fds[2];
	char		share[MAXPGPATH];
	char		python_path[MAXPGPATH + 32];
	char		port[16];
	char		identity[64];
	const char *host = server_host();
	const char *python = pgturso_python;
	pid_t		parent = getpid();
	pid_t		pid;

	get_share_path(my_exec_path, share);
	snprintf(python_path, sizeof(python_path), "%s/extension/pgturso_python", share);
	snprintf(port, sizeof(port), "%d", PostPortNumber);
	snprintf(identity, sizeof(identity), "%d", (int) parent);

	if (pipe(pipe_fds) != 0)
	{
		ereport(LOG, (errmsg("pgturso: could not create a pipe: %m")));
		return;
	}
	fflush(NULL);
	pid = fork();
	if (pid < 0)
	{
		ereport(LOG, (errmsg("pgturso: could not start the Python worker: %m")));
		close(pipe_fds[0]);
		close(pipe_fds[1]);
		return;
	}
	if (pid == 0)
	{
		/* The child: its own process group, killed if this worker dies, output into the pipe. */
		char	   *argv[] = {(char *) python, "-m", "pgturso", "run", NULL};
		int			devnull = open("/dev/null", O_RDONLY, 0);
		int			signo;
		sigset_t	none;

		setpgid(0, 0);
		prctl(PR_SET_PDEATHSIG, SIGKILL);
		if (getppid() != parent)
			_exit(1);
		for (signo = 1; signo < NSIG; signo++)
			signal(signo, SIG_DFL);
		sigemptyset(&none);
		sigprocmask(SIG_SETMASK, &none, NULL);
		if (devnull >= 0)
			dup2(devnull, STDIN_FILENO);
		dup2(pipe_fds[1], STDOUT_FILENO);
		dup2(pipe_fds[1], STDERR_FILENO);
		closefrom(3);

		setenv("PGHOST", host, 1);
		setenv("PGPORT", port, 1);
		setenv("PGDATABASE", worker_database, 1);
		if (pgturso_role != NULL && pgturso_role[0] != '\0')
			setenv("PGUSER", pgturso_role, 1);
		setenv("PGTURSO_TARGET", worker_target, 1);
		setenv("PGTURSO_BACKGROUND_WORKER", identity, 1);
		setenv("PYTHONPATH", python_path, 1);
		setenv("PYTHONUNBUFFERED", "1", 1);
		unsetenv("PGTURSO_DSN");
		execvp(python, argv);
		dprintf(STDERR_FILENO, "cannot run %s (pgturso.python): %s\n", python, strerror(errno));
		_exit(EXIT_FATAL);
	}
	/* Also here, so that a signal to the group cannot race the child's own setpgid. */
	setpgid(pid, pid);
	close(pipe_fds[1]);
	if (child_output >= 0)
		close(child_output);
	child_output = pipe_fds[0];
	output_len = 0;
	fcntl(child_output, F_SETFL, O_NONBLOCK);
	fcntl(child_output, F_SETFD, FD_CLOEXEC);
	child_pid = pid;
	child_started_at = GetCurrentTimestamp();
	ereport(LOG, (errmsg("pgturso %s/%s: started the Python worker (pid %d)",
						 worker_database, worker_target, (int) pid)));
}

static void
report_activity(void)
{
	char		activity[2 * NAMEDATALEN + 64];	/* never cut: both names are shorter than NAMEDATALEN */

	if (child_pid != 0)
		snprintf(activity, sizeof(activity), "delivering %s/%s: Python worker pid %d",
				 worker_database, worker_target, (int) child_pid);
	else
		snprintf(activity, sizeof(activity), "%s/%s: Python worker not running",
				 worker_database, worker_target);
	pgstat_report_activity(child_pid != 0 ? STATE_RUNNING : STATE_IDLE, activity);
}

void
pgturso_worker_main(Datum main_arg)
{
	int			index = DatumGetInt32(main_arg);
	List	   *entries = NIL;
	const char *reason = NULL;
	TimestampTz start_at = 0;
	TimestampTz stop_checked_at = 0;
	bool		stopping = false;
	pid_t		reported_pid = -1;
	char		appname[NAMEDATALEN];
	char		name[2 * NAMEDATALEN + 16];

	pqsignal(SIGTERM, handle_sigterm);
	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGCHLD, handle_sigchld);
	pqsignal(SIGQUIT, handle_sigquit);
	BackgroundWorkerUnblockSignals();

	if (!parse_databases(pgturso_database, &entries, &reason) || index >= list_length(entries) ||
		!split_entry((const char *) list_nth(entries, index), worker_database, worker_target, &reason))
		proc_exit(0);			/* cannot happen: the same value was parsed at registration */

	BackgroundWorkerInitializeConnection(NULL, NULL, 0);
	snprintf(name, sizeof(name), "pgturso %s/%s", worker_database, worker_target);
	copy_clipped(appname, sizeof(appname), name);
	pgstat_report_appname(appname);

	for (;;)
	{
		TimestampTz now = GetCurrentTimestamp();
		long		timeout_ms = 1000;
		int			delay;
		int			events;
		int			rc;

		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
			if (child_pid != 0)
				kill(-child_pid, SIGHUP);
			start_at = now;		/* a fixed setting may be why the child stopped */
		}
		if (got_sigterm)
			break;

		delay = reap_child();
		if (delay >= 0)
			start_at = TimestampTzPlusMilliseconds(now, delay * 1000L);

		if (!stopping && TimestampDifferenceExceeds(stop_checked_at, now, 1000))
		{
			stop_checked_at = now;
			if (server_stopping())
			{
				stopping = true;
				if (child_pid != 0)
					ereport(LOG, (errmsg("pgturso %s/%s: the server is shutting down: stopping the Python worker",
										 worker_database, worker_target)));
				stop_child();
			}
		}

		if (child_pid != 0 && !pgturso_enabled)
		{
			ereport(LOG, (errmsg("pgturso %s/%s: pgturso.enabled is off: stopping the Python worker",
								 worker_database, worker_target)));
			stop_child();
		}
		else if (child_pid == 0 && pgturso_enabled && !stopping)
		{
			if (now >= start_at)
				start_child();
			else
				timeout_ms = Min(timeout_ms, (long) ((start_at - now) / 1000) + 1);
		}

		if (reported_pid != child_pid)
		{
			reported_pid = child_pid;
			report_activity();
		}

		events = WL_LATCH_SET | WL_TIMEOUT | WL_POSTMASTER_DEATH;
		if (child_output >= 0)
			events |= WL_SOCKET_READABLE;
		rc = WaitLatchOrSocket(MyLatch, events, child_output, timeout_ms, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
		/* DROP DATABASE and DROP TABLESPACE wait until every process has absorbed their barrier. */
		if (ProcSignalBarrierPending)
			ProcessProcSignalBarrier();
		if (rc & WL_POSTMASTER_DEATH)
		{
			if (child_pid != 0)
				kill(-child_pid, SIGKILL);
			proc_exit(1);
		}
		if (rc & WL_SOCKET_READABLE)
			read_child_output();
	}

	/* SIGTERM: pg_terminate_backend, or a shutdown that found no client connection left to wait for. */
	if (child_pid != 0)
		ereport(LOG, (errmsg("pgturso %s/%s: terminated: stopping the Python worker",
							 worker_database, worker_target)));
	stop_child();
	/* Exit 1: after pg_terminate_backend the postmaster starts this worker again; at shutdown it does not. */
	proc_exit(1);
}
