# One BEAM node of the comparison: the original library's mechanism in a few
# lines, driven by the chaos harness exactly like the `node` binary (same
# environment, same output), so both go through the same faults and the same
# checker. Started by node.sh.
#
# What it does, as Elixir Highlander does:
# - each id gets a GenServer that registers {:hl, id} with :global; the one
#   that registers runs the singleton (here: prints START and waits);
# - the others monitor the holder and try to register again when it exits;
# - on a name conflict after a netsplit heals, :global calls our resolver,
#   which keeps one pid and stops the other with :shutdown; the loser prints
#   STOP ... conflict and its supervisor restarts it as a standby.
#
# Environment: HIGHLANDER_NODE (short name), HL_IDS (comma-separated),
# HL_PEERS (full node names), HL_CTL_DIR (the harness writes `cut` or `heal`
# to $HL_CTL_DIR/$HIGHLANDER_NODE to partition this node from the others;
# without it the node never reconnects after a nodedown).
#
# Output, one line each: READY <node>, START <unix_nanos> <node> <id> <token>,
# STOP <unix_nanos> <node> <id> <token> <reason>. The token is the tenure's
# start time in nanoseconds (the BEAM hands out no fencing token).

defmodule HlBeam do
  def node_name, do: System.get_env("HIGHLANDER_NODE")

  def emit(line) do
    IO.write(line <> "\n")
  end

  def event(kind, id, token, reason \\ nil) do
    suffix = if reason, do: " #{reason}", else: ""
    emit("#{kind} #{System.os_time(:nanosecond)} #{node_name()} #{id} #{token}#{suffix}")
  end
end

defmodule HlBeam.Singleton do
  use GenServer

  def start_link(id), do: GenServer.start_link(__MODULE__, id)

  def child_spec(id) do
    %{id: {__MODULE__, id}, start: {__MODULE__, :start_link, [id]}, shutdown: 500}
  end

  @impl true
  def init(id) do
    Process.flag(:trap_exit, true)
    {:ok, %{id: id, token: nil, ref: nil}, {:continue, :claim}}
  end

  @impl true
  def handle_continue(:claim, s), do: {:noreply, claim(s)}

  # :global calls this on a conflict after a heal: keep pid1, stop pid2.
  def resolve(_name, pid1, pid2) do
    Process.exit(pid2, :name_conflict)
    pid1
  end

  defp claim(s) do
    case :global.register_name({:hl, s.id}, self(), &__MODULE__.resolve/3) do
      :yes ->
        token = System.os_time(:nanosecond)
        HlBeam.event("START", s.id, token)
        %{s | token: token, ref: nil}

      :no ->
        case :global.whereis_name({:hl, s.id}) do
          :undefined ->
            Process.send_after(self(), :claim, 1)
            s

          pid ->
            %{s | ref: Process.monitor(pid)}
        end
    end
  end

  @impl true
  def handle_info(:claim, s), do: {:noreply, claim(s)}

  def handle_info({:DOWN, ref, :process, _, _}, %{ref: ref} = s),
    do: {:noreply, claim(%{s | ref: nil})}

  def handle_info({:EXIT, _, :name_conflict}, %{token: token} = s) when token != nil do
    HlBeam.event("STOP", s.id, token, "conflict")
    {:stop, :shutdown, %{s | token: nil}}
  end

  def handle_info(_, s), do: {:noreply, s}

  @impl true
  def terminate(_reason, %{token: token} = s) when token != nil do
    HlBeam.event("STOP", s.id, token, "node_shutdown")
  end

  def terminate(_, _), do: :ok
end

defmodule HlBeam.Signals do
  # SIGTERM stops the singletons (their terminate runs, the names are freed)
  # and then the VM, like the `node` binary's graceful shutdown.
  @behaviour :gen_event
  def init(_), do: {:ok, nil}

  def handle_event(:sigterm, s) do
    spawn(fn ->
      try do
        Supervisor.stop(HlBeam.Sup, :shutdown)
      catch
        # Not started yet (still syncing with the cluster): nothing to stop.
        _, _ -> :ok
      end

      :erlang.halt(0)
    end)

    {:ok, s}
  end

  def handle_event(_, s), do: {:ok, s}
  def handle_call(_, s), do: {:ok, :ok, s}
  def handle_info(_, s), do: {:ok, s}
  def terminate(_, _), do: :ok
  def code_change(_, s, _), do: {:ok, s}
end

defmodule HlBeam.Control do
  # Polls the control file every 2 ms: `cut` disconnects this node from
  # every other and keeps it apart (dist_auto_connect is `once`); otherwise
  # it connects to any peer it is not connected to every 20 ms, as a
  # cluster manager such as libcluster does, so a node back from a pause or
  # a cut rejoins and :global sees the conflict.
  def loop(path, peers, last, tick) do
    now = File.read(path) |> elem_or("")
    cut = String.trim(now) == "cut"

    cond do
      cut and now != last -> Enum.each(Node.list(), &Node.disconnect/1)
      not cut and (now != last or rem(tick, 10) == 0) -> reconnect(peers)
      true -> :ok
    end

    Process.sleep(2)
    loop(path, peers, now, tick + 1)
  end

  defp reconnect(peers) do
    connected = Node.list()
    peers |> Enum.reject(&(&1 in connected)) |> Enum.each(&Node.connect/1)
  end

  defp elem_or({:ok, v}, _), do: v
  defp elem_or(_, d), do: d
end

ids = System.get_env("HL_IDS", "solo") |> String.split(",", trim: true)

peers =
  System.get_env("HL_PEERS", "")
  |> String.split(",", trim: true)
  |> Enum.map(&String.to_atom/1)
  |> Enum.reject(&(&1 == node()))

:gen_event.delete_handler(:erl_signal_server, :erl_signal_handler, :ok)
:ok = :gen_event.add_handler(:erl_signal_server, HlBeam.Signals, [])
HlBeam.emit("READY #{HlBeam.node_name()}")
Enum.each(peers, &Node.connect/1)
# Learn the names the cluster holds before registering any: without this a
# node that has just connected registers an id the others hold and :global
# settles the conflict a moment later. (After READY: while a peer is cut
# off the sync can wait until the heal.)
:global.sync()

{:ok, _} =
  Supervisor.start_link(Enum.map(ids, &HlBeam.Singleton.child_spec/1),
    strategy: :one_for_one,
    max_restarts: 1000,
    max_seconds: 1,
    name: HlBeam.Sup
  )

case System.get_env("HL_CTL_DIR") do
  nil -> Process.sleep(:infinity)
  dir -> HlBeam.Control.loop(Path.join(dir, HlBeam.node_name()), peers, "", 0)
end
